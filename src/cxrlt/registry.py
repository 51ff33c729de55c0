"""Name -> builder registries, so params.yaml can say `loss: asl` or `head: linear`.

One mechanism for losses, heads and (later) samplers: an unknown name is a one-line error
that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cxrlt.errors import DataError


class Registry(dict[str, Callable[..., Any]]):
    def __init__(self, kind: str, plural: str | None = None):
        super().__init__()
        self.kind, self.plural = kind, plural or f"{kind}s"

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = builder
            return builder

        return deco

    def get_builder(self, name: str) -> Callable[..., Any]:
        if name not in self:
            raise DataError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(sorted(self))}")
        return self[name]
