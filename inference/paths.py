"""Confine client-supplied paths (``studyPath``, a job's ``in_dir``) to a configured root."""

from __future__ import annotations

import os
from pathlib import Path

from inference.errors import BadRequest, Forbidden

#: Longest path a client may name, and longest folder or file name in it (Linux's NAME_MAX).
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255


def resolve_inside(root: Path | None, requested: str, *, setting: str = "INFERENCE_DATA_ROOT") -> Path:
    """``requested`` (relative to ``root``, or absolute) as a real path that lies inside ``root``.

    ``..`` and symlinks are resolved first, so neither can lead out of the root. Raises
    ``Forbidden`` (403) when the path leaves the root or no root is configured, ``BadRequest``
    (400) for a path too long to be one. Messages never show the root.
    """
    if root is None:
        raise Forbidden(f"reading folders on the server is disabled; set {setting} to allow a data root")
    if not isinstance(requested, str) or not requested or "\0" in requested:
        raise Forbidden("the path must be a non-empty string")
    if len(requested) > MAX_PATH_CHARS or any(len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
                                              for name in requested.split("/")):
        raise BadRequest(f"the path is too long ({len(requested)} characters): at most {MAX_PATH_CHARS}, "
                         f"and {MAX_NAME_BYTES} bytes per folder name")
    real_root = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(real_root / requested))
    if candidate != real_root and real_root not in candidate.parents:
        raise Forbidden(f"path {shown(requested)} is outside the data root; give a folder inside {setting}")
    return candidate


def shown(requested: str, limit: int = 120) -> str:
    """A client's path for an error message: quoted, and shortened when long."""
    return repr(requested if len(requested) <= limit else requested[:limit] + "...")


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    return real == real_root or real_root in real.parents


#: The process umask of the server, the node and the workers: what they create (job store, history, audit trail,
#: users, job folders and results: patient data) is the service user's alone, files 0600 and folders 0700.
PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Make every file and folder this process creates from now on private to its user (``PRIVATE_UMASK``)."""
    os.umask(PRIVATE_UMASK)
