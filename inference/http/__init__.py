"""What serving over HTTP needs besides the ``Gateway`` class: gunicorn's worker class, the OpenAPI document,
the roles declared on routes and the gateway's own blueprints (metrics, audit, models)."""
