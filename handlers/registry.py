"""The one registry of handlers: inference commands mapped to plain functions.

A handler is ``handler(json_input, dicom_instances, input_hash) -> (response_json, buffers)``.
Modules in ``handlers/`` register theirs at import time with ``@register("command-name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from utils.errors import BadRequest

Handler = Callable[[dict, Sequence[Any], str], tuple[dict, list]]


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler: its command, optional own route, and optional warm-up (model loading)."""

    command: str
    handler: Handler
    route: str | None = None
    description: str = ""
    warm_up: Callable[[], None] | None = None


class Registry:
    """Commands to handlers; a command can be registered once."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    def register(self, command: str, *, route: str | None = None, description: str = "",
                 warm_up: Callable[[], None] | None = None) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` under ``command`` (and ``route``, if given)."""

        def decorator(handler: Handler) -> Handler:
            if command in self._specs:
                raise ValueError(f"inference command {command!r} is already registered "
                                 f"by {self._specs[command].handler.__module__}")
            summary = description or (handler.__doc__ or "").strip().split("\n")[0]
            self._specs[command] = HandlerSpec(command, handler, route, summary, warm_up)
            return handler

        return decorator

    def get(self, command: str) -> HandlerSpec:
        """The spec for ``command``; a 400 listing the known commands when there is none."""
        try:
            return self._specs[command]
        except KeyError:
            raise BadRequest(f"unknown inference_command {command!r}; known commands: "
                             f"{', '.join(sorted(self._specs))}") from None

    def specs(self) -> list[HandlerSpec]:
        return list(self._specs.values())

    def commands(self) -> list[str]:
        return sorted(self._specs)


REGISTRY = Registry()
register = REGISTRY.register
