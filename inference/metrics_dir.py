"""The folder where gunicorn's workers keep their metrics: emptied at start, dead workers dropped.

Used by ``gunicorn.conf.py``'s hooks in gunicorn's master, which must not import ``inference.metrics``
(that would create metric files for the master itself).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import multiprocess


def prepare_multiproc_dir(path: Path) -> None:
    """Empty (or create) the multiprocess folder at server start: old samples would be summed in."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def worker_exited(path: Path | None, pid: int) -> None:
    """gunicorn ``child_exit`` hook: drop the live gauges of a dead worker."""
    if path is not None and path.is_dir():
        multiprocess.mark_process_dead(pid, str(path))
