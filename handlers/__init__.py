"""Handlers the gateway serves; importing a module registers its handlers in ``REGISTRY``, and the manifest's
declared families (a ``command:`` each) are registered with the generic handler of ``handlers.declared``."""

from __future__ import annotations

import importlib
from pathlib import Path

from inference.pipeline.handler_registry import REGISTRY, Handler, HandlerSpec, Param, register

#: Modules holding the shipped handlers, imported by ``load_handlers``.
HANDLER_MODULES = ("handlers.mock", "handlers.hippocampus", "handlers.gaussian_blur")


def load_handlers(manifest: Path | None = None) -> list[HandlerSpec]:
    """Import every shipped handler module (registering its handlers), register the declared families of
    ``manifest`` (default: ``INFERENCE_MODEL_MANIFEST``'s), and return all specs."""
    from handlers.declared import register_declared
    from inference.config import get_settings

    for name in HANDLER_MODULES:
        importlib.import_module(name)
    register_declared(manifest if manifest is not None else get_settings().model_manifest)
    return REGISTRY.specs()


__all__ = ["REGISTRY", "Handler", "HandlerSpec", "Param", "register", "load_handlers"]
