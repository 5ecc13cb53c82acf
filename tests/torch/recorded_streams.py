"""A stand-in for CUDA's streams that records what the torch backend asks of them.

Lets the side-stream protocol be tested on CPU (``monkeypatch.setattr(torch_backend,
"STREAMS", Recorder())``); the CUDA tests run it for real where a GPU is present.
"""

from __future__ import annotations

import contextlib
from typing import Any


class Recorder:
    """Stands in for CUDA streams on CPU: records every stream operation, in order."""

    class Stream:
        def __init__(self, log: list[tuple[str, ...]], name: str) -> None:
            self.log, self.name, self.events = log, name, 0

        def wait_stream(self, other: Any) -> None:
            self.log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event: str) -> None:
            self.log.append(("wait_event", self.name, event))

        def record_event(self) -> str:
            self.events += 1
            event = f"{self.name}#{self.events}"
            self.log.append(("record_event", event))
            return event

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.main = self.Stream(self.log, "main")
        self.side = self.Stream(self.log, "side")
        self.inside = False

    def current(self, device: Any) -> Any:
        return self.side if self.inside else self.main

    def new(self, device: Any) -> Any:
        return self.side

    @contextlib.contextmanager
    def using(self, stream: Any) -> Any:
        self.log.append(("enter", stream.name))
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            self.log.append(("exit", stream.name))

    def keep(self, tensor: Any, stream: Any) -> None:
        self.log.append(("keep", tuple(tensor.shape), stream.name))
