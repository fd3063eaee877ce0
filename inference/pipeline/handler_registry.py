"""The one registry of handlers: inference commands mapped to plain functions and their parameters.

A handler is ``handler(instances, context) -> (response_json, buffers)``: the checked DICOM
instances and a ``HandlerContext`` (``inference.pipeline.context``). Modules in ``handlers/``
register theirs at import time with ``@register("command-name", params=[Param(...)])``; the
pipeline validates the declared parameters before a handler runs, whichever way the request came in.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference.errors import BadRequest
from inference.pipeline.context import Handler
from inference.protocol.request import PROTOCOL_KEYS

#: Parameter kinds and the JSON type each one takes.
PARAM_KINDS = ("number", "integer", "boolean", "string", "string-list")


@dataclass(frozen=True)
class Param:
    """A parameter a handler takes from the request JSON: its name, kind, allowed values and default."""

    name: str
    kind: str
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple | None = None

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {', '.join(PARAM_KINDS)}, "
                             f"got {self.kind!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def allowed(self) -> str:
        """The allowed values in words, for error messages and ``GET /models``."""
        if self.choices is not None:
            listed = ", ".join(map(repr, self.choices))
            return f"a list of {listed}" if self.kind == "string-list" else f"one of {listed}"
        words = {"number": "a number", "integer": "an integer", "boolean": "true or false",
                 "string": "a string", "string-list": "a list of strings"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            low = ">" if self.exclusive_minimum else ">="
            return f"{words} {low} {self.minimum:g} and <= {self.maximum:g}"
        if self.minimum is not None:
            return f"{words} {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if self.maximum is not None:
            return f"{words} <= {self.maximum:g}"
        return words

    def validate(self, value: Any) -> Any:
        """``value`` checked against the declaration (numbers as float/int); a 400 naming it otherwise."""
        if self._fits(value):
            return float(value) if self.kind == "number" else value
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise BadRequest(f"parameter {self.name!r} must be {self.allowed()}, got {shown}")

    def _fits(self, value: Any) -> bool:
        if self.kind == "boolean":
            return isinstance(value, bool)
        if self.kind == "string":
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if self.kind == "string-list":
            return (isinstance(value, list) and all(isinstance(v, str) for v in value)
                    and (self.choices is None or set(value) <= set(self.choices)))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "integer" and not isinstance(value, int):
            return False
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            return False
        if not math.isfinite(number):
            return False
        if self.minimum is not None and (number <= self.minimum if self.exclusive_minimum else number < self.minimum):
            return False
        return self.maximum is None or number <= self.maximum

    def describe(self) -> dict:
        """The declaration as JSON, for ``GET /models``."""
        out = {"name": self.name, "type": self.kind, "default": self.default, "allowed": self.allowed(),
               "description": self.description}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler: its command, parameters, optional own route and warm-up (model loading).

    ``warm_up(settings)`` runs once per serving process before requests, with that app's settings.
    """

    command: str
    handler: Handler
    route: str | None = None
    description: str = ""
    warm_up: Callable[[Any], Any] | None = None
    params: tuple[Param, ...] | None = field(default_factory=tuple)
    mock: bool = False
    family: str | None = None  # the model registry family whose versions ``model_version`` picks
    volume_input: bool = False  # also takes a volume of calibrated voxels (``HandlerContext.volume``)

    def validate_params(self, json_input: dict) -> dict:
        """The declared parameters of ``json_input``, checked, defaults filled in; unknown keys are a 400.

        A handler registered with ``params=None`` declares nothing and takes the JSON as it comes.
        """
        if self.params is None:
            return {}
        declared = {p.name: p for p in self.params}
        unknown = [key for key in json_input if key not in declared and key not in PROTOCOL_KEYS]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(declared) + sorted(PROTOCOL_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(declared) or "none"
            raise BadRequest(f"unknown parameter {key!r} for {self.command}{hint}; its parameters: {known}")
        return {name: param.validate(json_input[name]) if name in json_input else param.default
                for name, param in declared.items()}

    def describe(self) -> dict:
        """The handler as JSON, for ``GET /models``."""
        return {"inference_command": self.command, "route": self.route or "/", "description": self.description,
                "parameters": [p.describe() for p in self.params or ()], "mock": self.mock,
                "model_family": self.family, "volume_input": self.volume_input}


class HandlerRegistry:
    """Commands to handlers; a command can be registered once."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    def register(self, command: str, *, route: str | None = None, description: str = "",
                 warm_up: Callable[[Any], Any] | None = None, params: Sequence[Param] | None = (),
                 mock: bool = False, family: str | None = None,
                 volume_input: bool = False) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` under ``command`` (and ``route``, if given).

        ``params`` declares the request JSON keys the handler takes (others are refused);
        ``mock`` marks handlers served only when mocks are enabled; ``family`` names the model
        registry family whose versions a request's ``model_version`` chooses from; ``volume_input``
        says the handler also runs on a posted volume (``HandlerContext.volume``, no instances).
        """

        def decorator(handler: Handler) -> Handler:
            if command in self._specs:
                raise ValueError(f"inference command {command!r} is already registered "
                                 f"by {self._specs[command].handler.__module__}")
            names = [p.name for p in params or ()]
            clash = set(names) & PROTOCOL_KEYS or {n for n in names if names.count(n) > 1}
            if clash:
                raise ValueError(f"{command}: parameter names must be unique and not protocol keys: {sorted(clash)}")
            summary = description or (handler.__doc__ or "").strip().split("\n")[0]
            declared = None if params is None else tuple(params)
            self._specs[command] = HandlerSpec(command, handler, route, summary, warm_up, declared, mock, family,
                                              volume_input)
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


REGISTRY = HandlerRegistry()
register = REGISTRY.register
