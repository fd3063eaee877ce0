"""Security headers on every answer of the gateway, hooked into an app by one call (``install``).

Every answer: ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, no framing by any origin
(``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``: the review page's "Accept and release" button
cannot be clickjacked), ``Cache-Control: no-store`` (images, masks and result JSON are patient data), and
``Strict-Transport-Security`` when the gateway serves HTTPS. HTML pages get a strict Content-Security-Policy
allowing only their own inline script and style, by hash: a script an XSS would bring does not run.
"""

from __future__ import annotations

import base64
import hashlib
import re

import flask

from inference.config import Settings

#: Strict-Transport-Security when the gateway serves HTTPS: two years, as browsers' preload lists ask.
HSTS = "max-age=63072000"
#: Content-Security-Policy of answers that are not pages (JSON, images, multipart): nothing may run or frame them.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def _hashes(page: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                    for b in blocks)


def page_csp(page: str) -> str:
    """The CSP of a served page: its own inline ``<script>`` and ``<style>`` blocks (by SHA-256) and nothing else;
    it fetches from this origin and shows images it made from answers (``blob:``)."""
    return (f"default-src 'none'; script-src {_hashes(page, 'script')}; style-src {_hashes(page, 'style')}; "
            "img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def install(app: flask.Flask, settings: Settings, pages: dict[str, str]) -> dict[str, str]:
    """Add the security headers to every response ``app`` sends (errors and probes included); ``pages`` maps the
    path of each HTML page the app serves to its text (its policy is computed once from it). Returns the policies
    by path. The pages are handed in by the app's builder, so this module stays below the doors that own them."""
    tls = settings.tls_cert is not None
    page_csps = {path: page_csp(text) for path, text in pages.items()}

    @app.after_request
    def security_headers(response: flask.Response) -> flask.Response:
        headers = response.headers
        headers.setdefault("Content-Security-Policy", page_csps.get(flask.request.path, API_CSP))
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers["Cache-Control"] = "no-store"  # over send_file's no-cache: not even a revalidated copy on disk
        if tls:
            headers.setdefault("Strict-Transport-Security", HSTS)
        return response

    return page_csps
