"""Security headers on every answer of the gateway, hooked into an app by one call (``install``)."""

from __future__ import annotations

import flask

from inference.config import Settings

#: Strict-Transport-Security when the gateway serves HTTPS: two years, as browsers' preload lists ask.
HSTS = "max-age=63072000"


def install(app: flask.Flask, settings: Settings) -> None:
    """Add the security headers to every response ``app`` sends (errors and probes included)."""
    tls = settings.tls_cert is not None

    @app.after_request
    def security_headers(response: flask.Response) -> flask.Response:
        if tls:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response
