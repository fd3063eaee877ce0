"""``GET /audit``: the audit trail's records, for admins."""

from __future__ import annotations

import flask
from flask import Blueprint

from inference.audit import epoch
from inference.errors import BadRequest
from inference.http.current import gateway
from inference.http.roles import needs
from inference.users import ADMIN


def audit_blueprint() -> Blueprint:
    """The audit route; it reads the app's trail (a Gateway's ``audit``)."""
    blueprint = Blueprint("audit", __name__)

    @blueprint.get("/audit")
    @needs(ADMIN)
    def audit() -> flask.Response:
        """The audit trail's records, oldest first; filters ``study``, ``user``, ``from`` and ``to`` (ISO 8601)."""
        args = flask.request.args
        try:
            start, end = (epoch(args[name], name) if args.get(name) else None for name in ("from", "to"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        records = gateway().audit.search(
            study=args.get("study") or None, user=args.get("user") or None, start=start, end=end)
        return flask.jsonify({"records": records, "count": len(records)})

    return blueprint
