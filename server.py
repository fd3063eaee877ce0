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

from gateway import Gateway
from handlers import REGISTRY, load_handlers
from handlers.hippocampus.history import learn_decision
from inference.config import Settings, get_settings
from inference.http import headers as security_headers
from inference.http import throttle as auth_throttle
from inference.http.audit_routes import audit_blueprint
from inference.http.model_routes import model_blueprint
from inference.jobs.api import job_blueprint, job_service
from inference.jobs.executor import known_job_names
from inference.jobs.reviews import review_records
from inference.logs import configure_logging
from inference.pipeline.pipeline import Pipeline
from inference.radiomics.catalogue import Catalogue
from inference.radiomics.records import radiomics_records
from inference.radiomics.routes import RadiomicsDoor, family_commands, radiomics_blueprint
from inference.review.feedback import version_figures
from inference.review.page import REVIEW_PAGE
from inference.review.routes import review_blueprint
from inference.storage.backend import checked_backend
from inference.users import Authenticator, user_store
from models.registry import ManifestError, registry_for

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
               warm_up_first: bool = False, load_models: bool = True) -> Gateway:
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
    # inference/http/headers.py: on every answer; the review page's CSP allows its own inline script and style
    security_headers.install(app, settings, pages={"/review/": REVIEW_PAGE})
    auth_throttle.install(app, settings)  # inference/http/throttle.py: failed authentications audited, throttled
    backend = checked_backend(settings)  # the stores' backend: a store of another schema version stops here
    app.users = Authenticator(user_store(backend))  # named users, on the job store (python -m inference.users)
    store, runner = job_service(pipeline, backend)  # the job store and runner of INFERENCE_JOB_BACKEND
    reviews = review_records(backend)  # held results and the decisions on them
    records = radiomics_records(backend)  # the feedback store: Radiomics feedback and telemetry, review decisions
    try:
        catalogue = Catalogue(registry, family_commands(pipeline))
        radiomics = radiomics_blueprint(RadiomicsDoor(pipeline, catalogue, store, runner, records))
    except (ManifestError, ValueError) as exc:
        raise SystemExit(f"Radiomics API: {exc}") from None
    for blueprint in (
            job_blueprint(pipeline, store, runner, reviews),  # POST /job/, GET /query/<uid>, a job's files
            # /reviews, /review/; each decision also reaches the hippocampus history (a rejected result: no prior)
            review_blueprint(settings, store, reviews, records, registry,
                             on_decision=[partial(learn_decision, settings)]),
            radiomics,  # /api/...
            model_blueprint(pipeline, registry, settings,  # /models, /openapi.json
                            feedback=lambda family: version_figures(records, family).get(family, {}),
                            job_names=sorted(known_job_names(pipeline)), radiomics_models=sorted(catalogue.models)),
            audit_blueprint(),  # /audit
    ):  # /metrics and /ping are the gateway's own
        app.register_blueprint(blueprint)
    app.add_inference_route("/", mode)
    if mode is None:
        for spec in pipeline.specs:
            if spec.route:
                app.add_inference_route(spec.route, spec.command)
    health = {"status": "LOADING"}
    app.add_healthcheck_route(lambda: health["status"])

    def warm_up() -> None:
        health["status"] = pipeline.warm_up().health()
        if health["status"] != "READY":
            log.error("the healthcheck will not say READY: %s", health["status"])
            return
        log.info("READY: serving %s", ", ".join(commands))

    log.info("settings: %s", settings.describe())
    if not load_models:  # for reading the app's routes and metrics (the documentation's reference), no warm-up
        return app
    if warm_up_first:
        warm_up()
    else:
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    return app
