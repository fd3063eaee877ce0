"""The server: every registered handler behind one Gateway (gunicorn runs ``create_app()``).

    python mock_server.py            # every handler; inference_command picks one on POST /
    python mock_server.py -s3D       # only the 3D probability mask mock, on POST /
    gunicorn -c gunicorn.conf.py     # production: the same app under gunicorn

Without a flag, ``POST /`` runs the handler named by the request's ``inference_command``
(``INFERENCE_DEFAULT_COMMAND``, default ``get-probability-mask``, when it names none), and
handlers with their own route answer there too. ``GET /models`` lists what is served.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import threading
from collections.abc import Sequence

import flask
import yaml

from gateway import Gateway
from handlers import REGISTRY, load_handlers
from utils.config import Settings, get_settings
from utils.job_api import add_job_routes, known_job_names
from utils.openapi import openapi_document

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


def dispatch_by_command(default_command: str):
    """A handler for ``POST /`` that runs the handler named by ``inference_command``."""

    def run_named_handler(json_input: dict, instances: Sequence, input_hash: str):
        command = json_input.get("inference_command") or default_command
        return REGISTRY.get(str(command)).handler(json_input, instances, input_hash)

    return run_named_handler


def create_app(mode: str | None = None, settings: Settings | None = None, *,
               warm_up_first: bool = False) -> Gateway:
    """Build the gateway with every shipped handler; ``mode`` (a command) serves only that one on ``/``.

    Handlers' warm-ups (model loading) run in a background thread while ``/healthcheck`` answers
    ``LOADING``, or, with ``warm_up_first``, before this returns. gunicorn uses the latter: a worker
    then accepts no connection until it is warm, so with several workers the healthcheck (and every
    request) is answered by a ready worker, never by one that is still loading.
    """
    settings = settings or get_settings()
    configure_logging(settings)
    specs = load_handlers()
    app = Gateway(__name__, settings=settings)
    add_job_routes(app, settings)  # POST /job/, GET /query/<uid>
    health = {"status": "LOADING"}

    if mode is None:
        app.add_inference_route("/", dispatch_by_command(settings.default_command))
        for spec in specs:
            if spec.route:
                app.add_inference_route(spec.route, spec.handler)
    else:
        app.add_inference_route("/", REGISTRY.get(mode).handler)
    app.add_healthcheck_route(lambda: health["status"])

    @app.get("/models")
    def list_models():
        served = specs if mode is None else [REGISTRY.get(mode)]
        return flask.jsonify({
            "default_command": settings.default_command if mode is None else mode,
            "models": [{"inference_command": s.command, "route": s.route or "/", "description": s.description}
                       for s in served],
        })

    @app.get("/openapi.json")
    def openapi():
        served = specs if mode is None else [REGISTRY.get(mode)]
        return flask.jsonify(openapi_document([s.command for s in served], sorted(known_job_names()),
                                              token_required=bool(settings.api_token)))

    def warm_up() -> None:
        for spec in specs:
            if spec.warm_up is not None and (mode is None or spec.command == mode):
                log.info("warming up %s", spec.command)
                try:
                    spec.warm_up()
                except Exception as exc:  # keep serving the other handlers; the healthcheck tells
                    health["status"] = f"FAILED: {spec.command}: {type(exc).__name__}: {exc}"
                    log.exception("warm-up of %s failed; the healthcheck will not say READY", spec.command)
                    return
        health["status"] = "READY"
        log.info("READY: serving %s", ", ".join(REGISTRY.commands() if mode is None else [mode]))

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
    app = create_app(args.mode, settings)
    app.run(host=args.host, port=args.port, debug=args.debug, use_reloader=False, threaded=True)


if __name__ == "__main__":
    main()
