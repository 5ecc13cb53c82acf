"""``ToyArray``: a mutable wrapper around a numpy array that is not an array-API array."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ToyArray"]


def _data(x: Any) -> Any:
    return x.data if isinstance(x, ToyArray) else x


class ToyArray:
    """A numpy array in a box, without ``__array_namespace__`` (or ``__array__``).

    Only the toy backend recognises it. ``data`` is the numpy array; write into it
    (``x.data[...] = v``) to change the array in place.
    """

    def __init__(self, data: Any, dtype: Any = None) -> None:
        self.data = np.array(data, dtype=dtype, copy=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    def __repr__(self) -> str:
        return f"ToyArray({self.data!r})"

    def __sub__(self, other: Any) -> ToyArray:
        return ToyArray(self.data - _data(other))

    def __mul__(self, other: Any) -> ToyArray:
        return ToyArray(self.data * _data(other))

    def __truediv__(self, other: Any) -> ToyArray:
        return ToyArray(self.data / _data(other))
