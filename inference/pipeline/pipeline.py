"""The one inference pipeline: a command, the request JSON and a study's instances in, a checked result out.

Every front door (the HTTP gateway, the job executor, the command lines, the benchmark) only turns
its transport into "request JSON + instances" and calls ``Pipeline.run`` (or ``run_files`` for a
folder on disk); no front door calls a handler itself. The pipeline looks the command up, validates
the handler's declared parameters, resolves its model version, checks every DICOM instance, calls
the handler with its ``HandlerContext`` (``inference.pipeline.context``), checks the output
against the protocol and logs it under the input hash.

    pipeline = Pipeline(settings)
    spec, params, version = pipeline.check_request({"inference_command": "gaussian-blur-3d", "sigma_mm": 2})
    result = pipeline.run_files({"inference_command": "gaussian-blur-3d"}, files)
    result.response_json, result.buffers, result.input_hash, result.seconds
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from inference import metrics, protocol
from inference.config import Settings
from inference.dicom.header import InstanceHeader
from inference.dicom.series import Volume
from inference.dicom.validation import validate_instances
from inference.errors import BadRequest, GatewayError, OutputValidationError
from inference.logs import TaggedLogger, request_tags
from inference.pipeline.context import HandlerContext
from inference.pipeline.handler_registry import REGISTRY, HandlerRegistry, HandlerSpec
from inference.protocol.multipart_request import ParsedBody, PartSpool, parts_from_files
from inference.protocol.request import parse_json_object
from models.registry import ModelVersion, UnknownModel, registry_for

log = TaggedLogger(logging.getLogger("inference.pipeline"))


@dataclass(frozen=True)
class InferenceResult:
    """A handler's output, checked and normalised by ``protocol.prepare_output``."""

    command: str
    response_json: dict
    buffers: list
    input_hash: str
    seconds: float


class CheckedRequest(NamedTuple):
    """A request checked before anything runs: its handler, its parameters, the model version it runs."""

    spec: HandlerSpec
    params: dict
    model_version: ModelVersion | None


class Pipeline:
    """Runs registered handlers for one app: its settings, the commands it serves, its default command."""

    def __init__(self, settings: Settings, registry: HandlerRegistry = REGISTRY, *,
                 commands: Iterable[str] | None = None, default_command: str | None = None) -> None:
        self.settings = settings
        self.registry = registry
        served = registry.commands() if commands is None else list(commands)
        self._specs = {command: registry.get(command) for command in served}
        if default_command is not None and default_command not in self._specs:
            raise ValueError(f"the default command {default_command!r} is not served; "
                             f"served: {', '.join(sorted(self._specs))}")
        self.default_command = default_command

    @property
    def specs(self) -> list[HandlerSpec]:
        """The handlers this pipeline serves, in registration order."""
        return list(self._specs.values())

    def spec(self, command: str) -> HandlerSpec:
        """The served handler of ``command``; a 400 listing the served commands (and the nearest) otherwise."""
        try:
            return self._specs[command]
        except KeyError:
            close = difflib.get_close_matches(command, list(self._specs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadRequest(f"unknown inference_command {command!r}{hint}; this server serves: "
                             f"{', '.join(sorted(self._specs))}") from None

    def resolve_command(self, json_input: dict, command: str | None = None) -> str:
        """The command to run: ``command`` (a route's own), else the JSON's ``inference_command``, else the default."""
        if command is not None:
            return command
        named = json_input.get("inference_command")
        if named is not None and not isinstance(named, str):
            raise BadRequest(f"inference_command must be a string, got {named!r}")
        if named:
            return named
        if self.default_command:
            return self.default_command
        raise BadRequest("the request JSON names no inference_command and this server has no default "
                         f"(INFERENCE_DEFAULT_COMMAND); commands served: {', '.join(sorted(self._specs))}")

    def check_request(self, json_input: dict, command: str | None = None) -> CheckedRequest:
        """The handler, its validated parameters and model version for ``json_input``, running nothing (400s).

        ``model_version`` must name a version of the handler's model family (``models/manifest.yaml``);
        without it a family's handler runs the family's default version.
        """
        spec = self.spec(self.resolve_command(json_input, command))
        params = spec.validate_params(json_input)
        version = None
        if spec.family is not None:
            try:
                version = registry_for(self.settings.model_manifest).family(spec.family).resolve(
                    json_input.get("model_version"))
            except UnknownModel as exc:
                raise BadRequest(exc.message) from None
        elif "model_version" in json_input:
            raise BadRequest(f"{spec.command} has no model versions; remove model_version from the request")
        return CheckedRequest(spec, params, version)

    def run(self, json_input: dict, parts: Sequence[Any], input_hash: str, *, command: str | None = None,
            early_headers: Mapping[int, InstanceHeader] | None = None) -> InferenceResult:
        """Check the request and its DICOM ``parts``, run the handler, check its output.

        The result, or a ``GatewayError``.
        ``early_headers`` are DICOM headers already read while the parts streamed in, by part index.
        """
        spec, params, version = self.check_request(json_input, command)
        with request_tags(input_hash=input_hash):  # the handler's own TaggedLoggers carry the hash too
            # every instance the handler may read, checked once from its header: a clear 422, never a 500
            instances = validate_instances(parts, max_series_voxels=self.settings.max_series_voxels,
                                           early_headers=early_headers)
            context = HandlerContext(spec.command, json_input, params, input_hash, self.settings, version, parts)
            return self._run_handler(spec, json_input, context, instances, f"{len(instances)} instances")

    def run_volume(self, json_input: dict, volume: Volume, input_hash: str, *,
                   command: str | None = None) -> InferenceResult:
        """Run a handler registered with ``volume_input`` on a volume of calibrated voxels (no DICOM).

        The handler gets no instances and ``context.volume``; every mask it returns must lie on the
        volume's grid. ``input_hash`` is ``input_hash_of`` (``inference.protocol.input_hash``) of the request JSON
        and the posted body.
        """
        spec, params, version = self.check_request(json_input, command)
        if not spec.volume_input:
            raise BadRequest(f"{spec.command} reads DICOM instances only; it cannot run on a posted volume")
        with request_tags(input_hash=input_hash):  # the handler's own TaggedLoggers carry the hash too
            context = HandlerContext(spec.command, json_input, params, input_hash, self.settings, version, (),
                                     volume=volume)
            grid = dict(zip(("depth", "height", "width"), volume.voxels.shape, strict=True))

            def on_the_volume(response_json: dict) -> None:
                for part in response_json["parts"]:
                    shape = part.get("binary_data_shape", {})
                    if "depth" in shape and {key: shape[key] for key in grid} != grid:
                        raise OutputValidationError(f"{spec.command} returned a {part['binary_type']} of "
                                                    f"{shape}, not on the posted volume's grid {grid}")

            return self._run_handler(spec, json_input, context, [], f"a posted volume {volume.voxels.shape}",
                                     on_the_volume)

    def _run_handler(self, spec: HandlerSpec, json_input: dict, context: HandlerContext, instances: list,
                     described: str, check: Callable[[dict], None] | None = None) -> InferenceResult:
        """Run the handler and check its output, the same for every kind of input: the protocol's rules
        (``prepare_output``), ``check`` (the input's own), the response size limit; timed, counted, logged."""
        started = time.perf_counter()
        response_json, buffers = spec.handler(instances, context)
        response_json, buffers = protocol.prepare_output(response_json, buffers)
        seconds = time.perf_counter() - started
        if check is not None:
            check(response_json)
        metrics.observe_model(spec.command, json_input.get("model_version"), seconds)
        protocol.check_response_size(buffers, len(json.dumps(response_json)), self.settings.max_response_bytes)
        log.info("%s on %s: %s in %.3fs", spec.command, described,
                 ", ".join(p["binary_type"] for p in response_json["parts"]) or "JSON only", seconds)
        return InferenceResult(spec.command, response_json, buffers, context.input_hash, seconds)

    def run_body(self, body: ParsedBody, *, command: str | None = None) -> InferenceResult:
        """Run on a parsed request body: part 0 is the request JSON, the rest are the instances."""
        return self.run(request_json(body), body.parts[1:], body.input_hash, command=command, early_headers=body.early)

    def run_files(self, json_input: dict, files: Sequence[Path], *, command: str | None = None) -> InferenceResult:
        """Run on DICOM files on disk, hashed exactly as the same study uploaded with the same JSON would be."""
        with self.open_files(json_input, files) as body:
            return self.run_body(body, command=command)

    @contextmanager
    def open_files(self, json_input: dict, files: Sequence[Path]) -> Iterator[ParsedBody]:
        """The files as a request body (the JSON as part 0, as a viewer sends it); the spool is closed after."""
        spool = PartSpool(self.settings.spool_memory_bytes, self.settings.spool_dir,
                          self.settings.min_free_space_mb)
        try:
            yield parts_from_files(json.dumps(json_input).encode(), files, spool)
        finally:
            spool.close()

    def warm_up(self) -> WarmUp:
        """Run every served handler's warm-up (model loading) with this pipeline's settings.

        A warm-up that raises fails its command; one that returns a message serves in part (say, one
        model version of several could not be loaded). Neither stops the other warm-ups.
        """
        report = WarmUp()
        for spec in self.specs:
            if spec.warm_up is None:
                continue
            log.info("warming up %s", spec.command)
            try:
                problem = spec.warm_up(self.settings)
            except Exception as exc:
                log.exception("warm-up of %s failed", spec.command)
                report.failed[spec.command] = str(exc) if isinstance(exc, GatewayError) else \
                    f"{type(exc).__name__}: {exc}"
            else:
                if problem:
                    log.error("%s serves in part: %s", spec.command, problem)
                    report.degraded[spec.command] = str(problem)
        return report


@dataclass
class WarmUp:
    """How the warm-ups went: commands that cannot serve, and commands that serve in part, with why."""

    failed: dict[str, str] = field(default_factory=dict)
    degraded: dict[str, str] = field(default_factory=dict)

    def health(self) -> str:
        """The healthcheck's text: READY, DEGRADED (some model versions unavailable) or FAILED, with why."""
        if self.failed:
            return "FAILED: " + "; ".join(f"{command}: {why}"
                                          for command, why in {**self.failed, **self.degraded}.items())
        if self.degraded:
            return "DEGRADED: " + "; ".join(f"{command}: {why}" for command, why in self.degraded.items())
        return "READY"


def request_json(body: ParsedBody) -> dict:
    """Part 0 of a request as a JSON object, or a 400 saying why it is not one.

    The limits are ``inference.protocol.request``'s.
    """
    if not body.parts:
        raise BadRequest("the request has no parts; part 0 must be the request JSON")
    return parse_json_object(body.parts[0].read_bytes(), "part 0 (the request JSON)")
