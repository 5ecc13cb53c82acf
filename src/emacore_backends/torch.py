"""The torch backend: ``torch.Tensor`` and ``nn.Parameter`` on any device, updated in place.

Design invariants:

* Updates run under ``torch.no_grad()`` on detached parameters, in place, so shadows never
  join the autograd graph and no memory is allocated per step in the default mode.
* One fused multi-tensor call per (device, dtype) group: ``torch._foreach_lerp_`` (one pass
  over memory) by default; with ``exact=True`` (``compat="tensorflow"``) the reference
  kernel's three operations in its order, as ``_foreach`` calls, so the numbers are TF's bit
  for bit (that mode allocates its temporaries, as does a float32 shadow of a bfloat16
  parameter, whose difference is formed in float32).
* The (device, dtype) grouping of a list of shadows is computed once and kept on the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as _xp
import torch

from emacore._generic import ArrayAPIBackend
from emacore._pytree import ShadowList
from emacore.backend import Capabilities

__all__ = ["BACKEND", "TorchBackend"]


class _Grouping:
    """Indices of a shadow list by (device, dtype), so each group is one fused call."""

    def __init__(self, shadows: Sequence[Any]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, s in enumerate(shadows):
            groups.setdefault((s.device, s.dtype), []).append(i)
        self.groups = list(groups.values())
        self.size = len(shadows)


class TorchBackend(ArrayAPIBackend):
    """Backend for ``torch.Tensor`` (and ``nn.Parameter``) on any device.

    Examples
    --------
    >>> import torch
    >>> backend = TorchBackend()
    >>> shadows = backend.create_shadows([torch.zeros(2)], zeros=False)
    >>> backend.update(shadows, [torch.full((2,), 5.0)], 0.9, inplace=True)
    [tensor([4.5000, 4.5000])]
    """

    def __init__(self) -> None:
        super().__init__(
            "torch",
            Capabilities(mutable_arrays=True, inplace_update=True, fused_update=True),
        )

    def owns(self, x: Any) -> bool:
        """Return True for ``torch.Tensor`` (parameters included)."""
        return isinstance(x, torch.Tensor)

    def namespace(self, x: Any) -> Any:
        """Return array-api-compat's torch namespace."""
        return _xp

    def device(self, x: Any) -> Any:
        """Return the tensor's ``torch.device``."""
        return x.device

    def is_floating(self, x: Any) -> bool:
        """Return True for floating tensors (bfloat16 and float16 included)."""
        return bool(x.is_floating_point())

    def create_shadows(self, params: Sequence[Any], *, zeros: bool) -> list[Any]:
        """Return detached copies (or zeros) on each parameter's device."""
        with torch.no_grad():
            out = ShadowList(
                torch.zeros_like(p, memory_format=torch.contiguous_format)
                if zeros
                else p.detach().clone(memory_format=torch.contiguous_format)
                for p in params
            )
        out.backend_data = _Grouping(out)
        return out

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """Update every shadow toward its parameter: one fused call per (device, dtype)."""
        with torch.no_grad():
            if not inplace:
                shadows = self.create_shadows(shadows, zeros=False)
            grouping = getattr(shadows, "backend_data", None)
            if not isinstance(grouping, _Grouping) or grouping.size != len(shadows):
                grouping = _Grouping(shadows)
            single = len(grouping.groups) == 1
            for idx in grouping.groups:
                # under no_grad, reading parameters that require grad records nothing
                s_list = list(shadows) if single else [shadows[i] for i in idx]
                p_list = list(params) if single else [params[i] for i in idx]
                dtype = s_list[0].dtype
                mixed = any(p.dtype != dtype for p in p_list)  # bf16 params, f32 shadows
                if exact:
                    delta = torch._foreach_sub(s_list, p_list)
                    torch._foreach_mul_(delta, c)
                    torch._foreach_sub_(s_list, delta)
                elif mixed:
                    # _foreach_lerp_ wants one dtype; s - c * (s - p) promotes p exactly
                    torch._foreach_sub_(s_list, torch._foreach_sub(s_list, p_list), alpha=c)
                else:
                    torch._foreach_lerp_(s_list, p_list, c)
        return shadows if isinstance(shadows, list) else list(shadows)

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Shadows are ours and plain tensors: always writable."""

    def to_host(self, x: Any) -> Any:
        """Return a detached CPU tensor numpy can read."""
        return x.detach().cpu()

    def assign(self, dst: Any, src: Any) -> None:
        """Copy ``src`` into ``dst`` in place (outside autograd), across devices if needed."""
        with torch.no_grad():
            dst.copy_(src)

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """Parameters and buffers of an ``nn.Module`` by qualified name, in module order."""
        if not isinstance(obj, torch.nn.Module):
            return None
        # the order of module.state_dict(): each module's parameters, then its buffers;
        # a tensor shared by two modules (tied weights) is tracked under its first name and
        # listed again as "tied" under the others, so average(model) has every state_dict key
        out: list[tuple[str, Any, str]] = []
        seen: set[int] = set()
        for prefix, module in obj.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for name, p in module._parameters.items():
                if p is not None:
                    kind = "param" if p.requires_grad else "frozen"
                    out.append((dot + name, p, "tied" if id(p) in seen else kind))
                    seen.add(id(p))
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent_buffers_set:
                    out.append((dot + name, b, "tied" if id(b) in seen else "buffer"))
                    seen.add(id(b))
        return out


BACKEND = TorchBackend()
