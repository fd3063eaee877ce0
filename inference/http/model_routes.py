"""What is served: ``GET /models`` (commands and families), ``/models/<family>`` (versions and their
review figures), ``/models/<family>/monitoring`` (the drift watch) and ``/openapi.json``."""

from __future__ import annotations

from collections.abc import Callable

import flask
from flask import Blueprint

from inference import metrics
from inference.config import Settings
from inference.errors import NotFound
from inference.http.current import gateway
from inference.http.openapi import openapi_document
from inference.http.roles import needs
from inference.pipeline.pipeline import Pipeline
from inference.users import REVIEWER, SUBMITTER
from models import monitoring
from models.registry import ModelRegistry, UnknownModel


def model_blueprint(pipeline: Pipeline, registry: ModelRegistry, settings: Settings, *,
                    feedback: Callable[[str], dict], job_names: list[str], radiomics_models: list[str]) -> Blueprint:
    """The model routes; ``feedback(family)``: per version, its review decisions, feedback and telemetry.

    The drift collector of ``GET /metrics`` is added to the app (a Gateway) when the blueprint is registered.
    """
    blueprint = Blueprint("models", __name__)
    blueprint.record_once(lambda state: state.app.metrics_collectors.append(  # type: ignore[attr-defined]
        monitoring.DriftCollector(registry, lambda: metrics.watched_counts(settings.metrics_dir))))

    @blueprint.get("/models")
    @needs(SUBMITTER)
    def list_models() -> flask.Response:
        """The commands served (with their parameters) and the model registry's families."""
        return flask.jsonify({"default_command": pipeline.default_command,
                              "models": [spec.describe() for spec in pipeline.specs],
                              "families": registry.describe()})

    @blueprint.get("/models/<family>")
    @needs(SUBMITTER)
    def show_family(family: str) -> flask.Response:
        try:
            described = registry.family(family).describe(registry.failures)
        except UnknownModel as exc:
            raise NotFound(exc.message) from None
        # per version: review decisions (accepted, rejected, corrected, mean Dice of corrections), feedback, telemetry
        described["feedback"] = feedback(family)
        return flask.jsonify(described)

    @blueprint.get("/models/<family>/monitoring")
    @needs(REVIEWER)  # aggregates per model version, no patient data; for those who judge results
    def monitor_family(family: str) -> flask.Response:
        """Drift watch: what each version served (inputs, volumes, uncertainty, flags) against its training split."""
        try:
            return flask.jsonify(monitoring.summary(registry, family, metrics.watched_counts(settings.metrics_dir)))
        except UnknownModel as exc:
            raise NotFound(exc.message) from None

    @blueprint.get("/openapi.json")
    @needs(SUBMITTER)
    def openapi() -> flask.Response:
        """This OpenAPI 3.0 document of the JSON routes, from the commands and models served."""
        users = gateway().users
        return flask.jsonify(openapi_document([spec.command for spec in pipeline.specs], job_names,
                                              token_required=bool(settings.api_token) or users.any_users(),
                                              radiomics_models=radiomics_models))

    return blueprint
