"""The production server: every real handler behind one Gateway, with the job API (gunicorn runs ``create_app()``).

    gunicorn -c gunicorn.conf.py     # production: the real handlers (mocks with INFERENCE_ENABLE_MOCKS=1)

``POST /`` runs the handler named by the request's ``inference_command`` (``INFERENCE_DEFAULT_COMMAND``
when it names none), and handlers with their own route answer there too. ``GET /models`` lists what
is served, ``GET /openapi.json`` describes it. ``mock_server.py`` builds the same app for development.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

import flask

from gateway import Gateway
from handlers import REGISTRY, load_handlers
from handlers.hippocampus.history import learn_decision
from inference import metrics
from inference.audit import epoch
from inference.config import Settings, get_settings
from inference.errors import BadRequest, NotFound
from inference.http.openapi import openapi_document
from inference.jobs.api import add_job_routes
from inference.jobs.executor import known_job_names
from inference.jobs.reviews import review_store
from inference.logs import configure_logging
from inference.pipeline.pipeline import Pipeline
from inference.radiomics.catalogue import Catalogue
from inference.radiomics.routes import add_radiomics_routes, family_commands, records_for
from inference.review.feedback import version_figures
from inference.review.routes import add_review_routes
from inference.users import Authenticator, user_store
from models import monitoring
from models.registry import ManifestError, UnknownModel, registry_for

log = logging.getLogger("inference.server")


def served_commands(settings: Settings, mode: str | None = None) -> list[str]:
    """The commands an app serves: ``mode`` alone, else the real handlers, plus the mocks when enabled.

    Handlers of a model family serve only when the app's manifest has that family (the registry may
    hold declared families of another app's manifest in the same process).
    """
    try:
        specs = load_handlers(settings.model_manifest)
        families = registry_for(settings.model_manifest).families
    except (ManifestError, ValueError) as exc:  # unparsable, a broken default, a declared command taken twice
        raise SystemExit(f"model manifest: {exc}") from None
    if mode is not None:
        return [REGISTRY.get(mode).command]
    return [spec.command for spec in specs
            if (settings.enable_mocks or not spec.mock) and (spec.family is None or spec.family in families)]


def create_app(mode: str | None = None, settings: Settings | None = None, *,
               warm_up_first: bool = False) -> Gateway:
    """Build the gateway; ``mode`` (a command) serves only that one on ``/``.

    Without ``mode`` it serves the real handlers, and the mocks too when ``INFERENCE_ENABLE_MOCKS`` is
    set; ``POST /`` runs the request's ``inference_command`` (else ``INFERENCE_DEFAULT_COMMAND``).
    Handlers' warm-ups (model loading) run in a background thread while ``/healthcheck`` answers
    ``LOADING``, or, with ``warm_up_first``, before this returns. gunicorn uses the latter: a worker
    then accepts no connection until it is warm, so with several workers the healthcheck (and every
    request) is answered by a ready worker, never by one that is still loading.
    """
    settings = settings or get_settings()
    configure_logging(settings.logging_config)
    commands = served_commands(settings, mode)
    default = mode or settings.default_command
    if default is not None and default not in commands:
        raise SystemExit(f"INFERENCE_DEFAULT_COMMAND={default!r} is not served; served: {', '.join(commands)} "
                         "(mocks need INFERENCE_ENABLE_MOCKS=1)")
    try:
        registry = registry_for(settings.model_manifest)  # a manifest that does not parse stops start-up here
    except ManifestError as exc:
        raise SystemExit(f"model manifest: {exc}") from None
    pipeline = Pipeline(settings, REGISTRY, commands=commands, default_command=default)
    app = Gateway(__name__, pipeline=pipeline)
    users = app.users = Authenticator(user_store(settings))  # named users, on the job store (python -m inference.users)
    store, runner = add_job_routes(app, pipeline)  # POST /job/, GET /query/<uid>
    records = records_for(settings)  # the feedback store: Radiomics feedback and telemetry, review decisions
    # /reviews, /review/; every decision also reaches the hippocampus result history (a rejected result is no prior)
    add_review_routes(app, store, review_store(store), records, registry,
                      on_decision=[partial(learn_decision, settings)])
    try:
        catalogue = Catalogue(registry, family_commands(pipeline))
        add_radiomics_routes(app, pipeline, catalogue, store, runner, records)  # /api/...
    except (ManifestError, ValueError) as exc:
        raise SystemExit(f"Radiomics API: {exc}") from None
    health = {"status": "LOADING"}

    app.add_inference_route("/", mode)
    if mode is None:
        for spec in pipeline.specs:
            if spec.route:
                app.add_inference_route(spec.route, spec.command)
    app.add_healthcheck_route(lambda: health["status"])

    @app.get("/models")
    def list_models():
        """The commands served (with their parameters) and the model registry's families."""
        return flask.jsonify({"default_command": pipeline.default_command,
                              "models": [spec.describe() for spec in pipeline.specs],
                              "families": registry.describe()})

    @app.get("/models/<family>")
    def show_family(family: str):
        try:
            described = registry.family(family).describe(registry.failures)
        except UnknownModel as exc:
            raise NotFound(exc.message) from None
        # per version: review decisions (accepted, rejected, corrected, mean Dice of corrections), feedback, telemetry
        described["feedback"] = version_figures(records, family).get(family, {})
        return flask.jsonify(described)

    @app.get("/models/<family>/monitoring")
    def monitor_family(family: str):
        """Drift watch: what each version served (inputs, volumes, uncertainty, flags) against its training split."""
        try:
            return flask.jsonify(monitoring.summary(registry, family, metrics.watched_counts(settings.metrics_dir)))
        except UnknownModel as exc:
            raise NotFound(exc.message) from None

    app.metrics_collectors.append(monitoring.DriftCollector(
        registry, lambda: metrics.watched_counts(settings.metrics_dir)))

    @app.get("/audit")
    def audit():
        """The audit trail's records, oldest first; filters ``study``, ``user``, ``from`` and ``to`` (ISO 8601)."""
        args = flask.request.args
        try:
            start, end = (epoch(args[name], name) if args.get(name) else None for name in ("from", "to"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        records = app.audit.search(study=args.get("study") or None, user=args.get("user") or None,
                                   start=start, end=end)
        return flask.jsonify({"records": records, "count": len(records)})

    @app.get("/openapi.json")
    def openapi():
        return flask.jsonify(openapi_document([spec.command for spec in pipeline.specs],
                                              sorted(known_job_names(pipeline)),
                                              token_required=bool(settings.api_token) or users.any_users(),
                                              radiomics_models=sorted(catalogue.models)))

    def warm_up() -> None:
        health["status"] = pipeline.warm_up().health()
        if health["status"] != "READY":
            log.error("the healthcheck will not say READY: %s", health["status"])
            return
        log.info("READY: serving %s", ", ".join(commands))

    log.info("settings: %s", settings.describe())
    if warm_up_first:
        warm_up()
    else:
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    return app
