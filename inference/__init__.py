"""The inference gateway's library: every layer below the entry points, each in its own package.

Imports only go down this list (``tests/test_layout.py`` checks it):

- front doors' machinery: ``http`` (gunicorn worker, OpenAPI), ``jobs`` (job store, executor,
  Celery backend, job routes), ``radiomics`` (the Radiomics Segmentation API: routes, protobuf
  schemas, catalogue, feedback records; it submits its jobs through ``jobs``); the entry points
  (``gateway.py``, ``server.py``, ``dicom_node.py``, ``worker.py``) sit above them at the top of the repository
- ``handlers/`` (top-level folder): the registered handler functions
- ``pacs``: study spool and routing rules (DICOM node), outbox and delivery of results
- ``pipeline``: the handler registry and ``Pipeline``, which every front door calls
- ``models/`` (top-level folder): the model registry, runtimes and networks
- ``protocol`` (the Arterys rules and wire format), ``dicom`` (reading, checking, writing
  DICOM), ``imaging`` (blur, rendering)
- ground floor: ``config`` (every setting), ``errors``, ``logs``, ``metrics``, ``paths``
"""
