"""Errors that carry an HTTP status: raised anywhere in a request, answered as JSON by the gateway.

Handlers raise these (or plain exceptions, which become 500) and stay free of Flask; the job
runner records the same messages for failed jobs.
"""

from __future__ import annotations


class GatewayError(Exception):
    """An error the client can act on; ``status`` is the HTTP status it is answered with, ``details`` extra
    fields of its JSON body (e.g. ``required_role``)."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None, **details: str) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if status is not None:
            self.status = status


class BadRequest(GatewayError):
    """Malformed request: bad multipart body, bad JSON part, unknown command (400)."""

    status = 400


class Unauthorized(GatewayError):
    """No bearer token where one is required (401)."""

    status = 401


class Forbidden(GatewayError):
    """Wrong token, or a path outside its configured root (403)."""

    status = 403


class NotFound(GatewayError):
    """Unknown job or resource (404)."""

    status = 404


class Conflict(GatewayError):
    """409: the resource is not in a state that allows the request (e.g. a job still running)."""

    status = 409


class RequestTimeout(GatewayError):
    """The request body stalled or arrived slower than the minimum upload rate (408)."""

    status = 408


class PayloadTooLarge(GatewayError):
    """Body larger than the configured limit (413)."""

    status = 413


class UnsupportedMediaType(GatewayError):
    """Content-Type the gateway does not speak (415)."""

    status = 415


class UnprocessableInput(GatewayError):
    """Well-formed request whose content the handler cannot use, e.g. a part that is not DICOM (422)."""

    status = 422


class OutputValidationError(GatewayError):
    """A handler's output breaks the protocol; the model developer must fix the handler (500)."""

    status = 500


class ServiceUnavailable(GatewayError):
    """A service the request needs is unreachable (the job broker, say); retrying later may work (503)."""

    status = 503
