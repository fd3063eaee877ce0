"""What the blueprints ask of the app serving the request (a ``gateway.Gateway``): its audit trail and who may
read what. The doors sit below the gateway's layer, so they reach it through Flask's ``current_app``."""

from __future__ import annotations

from typing import Any

from flask import current_app


def gateway() -> Any:
    """The app serving this request (a Gateway)."""
    return current_app


def audit_event(event: str, **fields: Any) -> None:
    """Append ``event`` to the app's audit trail with this request's user and client address."""
    gateway().audit_event(event, **fields)


def may_read(owner: str | None) -> bool:
    """Whether this request's user may read what ``owner`` submitted (submitters: only their own)."""
    return bool(gateway().may_read(owner))
