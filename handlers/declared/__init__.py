"""Declared families served with no code per model: one generic handler per manifest family with a ``command:``.

``register_declared(manifest)`` registers, for each such family, its command (``POST /`` with
``inference_command``, the job API, the DICOM node's rules, the Radiomics API's model list all look
commands up in the handler registry) with the generic handler of ``handler.py``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from handlers.declared.handler import DICOM_OUTPUTS, segment_declared, warm_up
from inference.pipeline.handler_registry import REGISTRY, HandlerRegistry, Param
from models.registry import registry_for


def register_declared(manifest: Path, registry: HandlerRegistry = REGISTRY) -> list[str]:
    """Register the command of every declared family of ``manifest`` (once); the commands, in manifest order.

    A command taken by another handler, or by another family, is a ValueError naming both.
    """
    commands = []
    for family in registry_for(manifest).families.values():
        if family.command is None:
            continue
        commands.append(family.command)
        if family.command in registry.commands():
            spec = registry.get(family.command)
            if spec.family == family.name and getattr(spec.handler, "declared_family", None) == family.name:
                continue  # registered by an earlier call (another app of this process)
            raise ValueError(f"family {family.name}: its command {family.command!r} is already served by "
                             f"{spec.family or spec.handler.__module__}; choose another command in the manifest")
        handler = partial(segment_declared, family=family.name)
        handler.declared_family = family.name  # type: ignore[attr-defined]
        handler.__doc__ = f"Segment {family.name} ({family.description}) as its manifest declares it."
        registry.register(
            family.command, warm_up=partial(warm_up, family=family.name), family=family.name, volume_input=True,
            description=family.description or f"{family.name} segmentation (declared in the model manifest)",
            params=[Param("dicom_outputs", "string-list", default=[], choices=DICOM_OUTPUTS,
                          description="DICOM results to add: 'seg' (a DICOM Segmentation), 'sr' (a TID 1500 "
                                      "volume report)")])(handler)
    return commands
