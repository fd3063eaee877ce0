"""Benchmark of the gateway against a floor (a bare WSGI app under the same gunicorn settings)."""
