"""What a handler receives besides its instances: one explicit argument, built by the pipeline.

    def my_handler(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
        level = context.params["level"]          # declared, checked, default filled in
        version = context.model_version          # the request's model_version, or the family's default
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference.config import Settings
from inference.dicom.instance import DicomInstance
from inference.dicom.series import Volume

if TYPE_CHECKING:  # models sit below the pipeline; the type is only named here
    from models.registry import ModelVersion


@dataclass(frozen=True)
class HandlerContext:
    """One handler call: its command, the request JSON, checked parameters, input hash, model version, settings.

    ``model_version`` is resolved once, by the pipeline, for handlers of a model family (the
    version the request names, else the family's default); None for the others.
    ``request_parts`` are the request's parts after the JSON, as sent (attachments included),
    for Arterys-style handlers that read the parts themselves. ``volume`` is set, and ``instances``
    empty, when the input came as calibrated voxels instead of DICOM (the Radiomics door; only for
    handlers registered with ``volume_input=True``).
    """

    command: str
    request_json: dict
    params: dict
    input_hash: str
    settings: Settings
    model_version: ModelVersion | None = None
    request_parts: Sequence[Any] = ()
    volume: Volume | None = None


#: A handler: checked instances and its context in, ``(response_json, buffers)`` out (``inference.protocol``).
Handler = Callable[[Sequence[DicomInstance], HandlerContext], tuple[dict, list]]
#: The Arterys SDK's handler signature, ``handler(json_input, dicom_instances, input_hash)``.
ArterysHandler = Callable[[dict, Sequence[Any], str], tuple[dict, list]]


def arterys_handler(function: ArterysHandler) -> Handler:
    """Adapt a handler written for the Arterys SDK: it gets the JSON, the request's parts and the hash."""

    def handler(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
        return function(context.request_json, context.request_parts, context.input_hash)

    handler.__name__ = function.__name__
    handler.__doc__ = function.__doc__
    return handler
