"""Container health check: exit 0 only when the local gateway's ``/healthcheck`` answers ``READY``.

    python healthcheck.py        # used by the Dockerfile's HEALTHCHECK and docker-compose.yml

Standard library only (the slim image has no curl). It asks the port in ``INFERENCE_PORT``
(default 8900) on the loopback address, or on ``INFERENCE_HOST`` when that names one address.
Any other answer (``LOADING``, an error status, no server) exits 1 with the reason on stderr,
which ``docker inspect`` shows under ``State.Health``. When ``INFERENCE_TLS_CERT`` is set it asks over
HTTPS, not verifying the (loopback) server and presenting the gateway's own certificate when client
certificates are required (``INFERENCE_TLS_CLIENT_CA``; the certificate must then allow client use).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

#: Bind-all addresses and the loopback address to ask instead.
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def healthcheck_url(environ: dict[str, str]) -> str:
    """The URL of the gateway's ``/healthcheck`` for the bind address and port in ``environ``."""
    port = environ.get("INFERENCE_PORT") or "8900"
    host = environ.get("INFERENCE_HOST") or "0.0.0.0"
    host = WILDCARD_HOSTS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if environ.get("INFERENCE_TLS_CERT") else "http"
    return f"{scheme}://{host}:{port}/healthcheck"


def tls_context(environ: dict[str, str]) -> ssl.SSLContext | None:
    """The context to ask an HTTPS gateway on this machine with; None for plain HTTP."""
    if not environ.get("INFERENCE_TLS_CERT"):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own loopback listener: its health, not its identity, is asked
    if environ.get("INFERENCE_TLS_CLIENT_CA"):
        context.load_cert_chain(environ["INFERENCE_TLS_CERT"], environ.get("INFERENCE_TLS_KEY") or None)
    return context


def check(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> tuple[bool, str]:
    """Whether ``url`` answers 200 with the body ``READY``, and what it answered otherwise."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),  # never via HTTP(S)_PROXY
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read(64)
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url} is not reachable: {exc}"
    if body != b"READY":
        return False, f"{url} answered {body[:32]!r}, not READY (still warming up?)"
    return True, "READY"


def main() -> int:
    environ = dict(os.environ)
    try:
        ready, message = check(healthcheck_url(environ), context=tls_context(environ))
    except (OSError, ssl.SSLError) as exc:  # the certificate files cannot be read
        ready, message = False, f"TLS client: {exc}"
    if not ready:
        sys.stderr.write(message + "\n")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
