"""Handlers the gateway serves; importing a module registers its handlers in ``REGISTRY``."""

from __future__ import annotations

import importlib

from inference.pipeline.handler_registry import REGISTRY, Handler, HandlerSpec, Param, register

#: Modules holding the shipped handlers, imported by ``load_handlers``.
HANDLER_MODULES = ("handlers.mock", "handlers.hippocampus", "handlers.gaussian_blur")


def load_handlers() -> list[HandlerSpec]:
    """Import every shipped handler module (registering its handlers) and return all specs."""
    for name in HANDLER_MODULES:
        importlib.import_module(name)
    return REGISTRY.specs()


__all__ = ["REGISTRY", "Handler", "HandlerSpec", "Param", "register", "load_handlers"]
