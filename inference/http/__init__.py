"""What serving over HTTP needs besides the ``Gateway`` class: gunicorn's worker class and the
OpenAPI document."""
