"""``GET /metrics``: Prometheus text format, summed over gunicorn's workers, plus the app's collectors."""

from __future__ import annotations

from flask import Blueprint, Response

from inference import metrics
from inference.http.current import gateway
from inference.http.roles import needs
from inference.users import ADMIN


def metrics_blueprint() -> Blueprint:
    """The metrics route; it reads the app's ``settings.metrics_dir`` and ``metrics_collectors`` (a Gateway's)."""
    blueprint = Blueprint("metrics", __name__)

    @blueprint.get("/metrics", endpoint="metrics")
    @needs(ADMIN)
    def metrics_text() -> Response:
        app = gateway()
        text, content_type = metrics.render(app.settings.metrics_dir, tuple(app.metrics_collectors))
        return Response(text, content_type=content_type)

    return blueprint
