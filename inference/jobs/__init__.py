"""Asynchronous jobs: the job stores (SQLite, Redis), the executor that runs one job through the
pipeline, the Celery backend, and the job API's HTTP routes."""
