"""Hippocampal volume: the ``get-hippocampus-volume`` handler, its report and its batch command line.

``handler`` (registered on import), ``orientation`` (DICOM <-> the model's axes), ``report`` (the
volumes, the Secondary Capture report, SEG and SR) and ``cli`` (``python -m handlers.hippocampus``).
"""

from handlers.hippocampus import handler  # noqa: F401  (registers get-hippocampus-volume)
