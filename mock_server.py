"""The server: registered handlers behind one Gateway (gunicorn runs ``create_app()``).

    python mock_server.py            # development: every handler, mocks included
    python mock_server.py -s3D       # only the 3D probability mask mock, on POST /
    gunicorn -c gunicorn.conf.py     # production: the real handlers (mocks with INFERENCE_ENABLE_MOCKS=1)

``POST /`` runs the handler named by the request's ``inference_command`` (``INFERENCE_DEFAULT_COMMAND``
when it names none; ``python mock_server.py`` defaults to ``get-probability-mask`` as the Arterys mock
server does), and handlers with their own route answer there too. ``GET /models`` lists what is served.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.config
import threading
from collections.abc import Sequence

import flask
import yaml

from gateway import Gateway
from handlers import REGISTRY, load_handlers
from utils.config import Settings, get_settings
from utils.job_api import add_job_routes
from models.registry import ManifestError, registry_for
from utils.errors import BadRequest, NotFound
from utils.pipeline import Pipeline

log = logging.getLogger("inference.server")

#: mock_server.py flags (as in the Arterys SDK's mock server) and the command each one serves.
MODE_FLAGS = {
    "-s2D": "get-probability-mask-2d",
    "-s3D": "get-probability-mask",
    "-b": "get-bounding-box-2d",
    "-cl": "get-classification",
}


def configure_logging(settings: Settings) -> None:
    """Load ``logging.yaml`` (or ``INFERENCE_LOGGING_CONFIG``); plain stderr logging if it is missing."""
    try:
        with open(settings.logging_config, encoding="utf-8") as handle:
            logging.config.dictConfig(yaml.safe_load(handle))
    except FileNotFoundError:
        logging.basicConfig(level=logging.INFO)
        log.warning("logging config %s not found; logging to stderr", settings.logging_config)


def served_commands(settings: Settings, mode: str | None = None) -> list[str]:
    """The commands an app serves: ``mode`` alone, else the real handlers, plus the mocks when enabled."""
    specs = load_handlers()
    if mode is not None:
        return [REGISTRY.get(mode).command]
    return [spec.command for spec in specs if settings.enable_mocks or not spec.mock]


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
    configure_logging(settings)
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
    add_job_routes(app, pipeline)  # POST /job/, GET /query/<uid>
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
            return flask.jsonify(registry.family(family).describe(registry.failures))
        except BadRequest as exc:
            raise NotFound(exc.message) from None

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    for flag, command in MODE_FLAGS.items():
        modes.add_argument(flag, dest="mode", action="store_const", const=command, help=f"serve only {command}")
    settings = get_settings()
    parser.add_argument("--host", default=settings.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default %(default)s)")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    args = parser.parse_args(argv)
    # the development server serves the mocks too, and answers a bare POST / with the 3D mock as before
    settings = dataclasses.replace(settings, enable_mocks=True,
                                   default_command=settings.default_command or MODE_FLAGS["-s3D"])
    app = create_app(args.mode, settings)
    app.run(host=args.host, port=args.port, debug=args.debug, use_reloader=False, threaded=True)


if __name__ == "__main__":
    main()
