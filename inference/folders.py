"""Folder settings checked at start: each created or found writable, or the start stops with one line naming
the setting, its value and why (not found by the first request that writes there)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from inference.config import Settings

#: Settings naming a folder the process writes to, or (True) a file whose folder it writes to.
FOLDER_SETTINGS: dict[str, bool] = {"spool_dir": False, "output_root": False, "pacs_root": False,
                                    "model_cache": False, "history_db": True, "audit_log": True}
#: What the API server (gunicorn) and a job worker write to; the DICOM node also writes to its PACS root.
SERVER_FOLDERS = ("spool_dir", "output_root", "model_cache", "history_db", "audit_log")
NODE_FOLDERS = (*SERVER_FOLDERS, "pacs_root")


class UnusableFolder(ValueError):
    """A folder setting that cannot work; the message is one line: the setting, its value and why."""


def _env_name(name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == name)


def effective_path(settings: Settings, name: str) -> tuple[Path, str]:
    """The path setting ``name`` means (its default when unset) and how to show it in a message."""
    value = getattr(settings, name)
    if value is not None:
        return Path(value), str(value)
    if name == "spool_dir":
        folder = Path(tempfile.gettempdir())
        return folder, f"(unset: the system temp folder {folder})"
    default = Path(settings.output_root) / {"history_db": "history.sqlite3", "audit_log": "audit.jsonl"}[name]
    return default, f"(unset: {default})"


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be written to after creating it (with its parents) if missing; None when it can."""
    if folder.exists() and not folder.is_dir():
        return "it is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"it cannot be created ({exc.strerror})"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".start-check-"):
            pass
    except OSError as exc:  # permissions, a read-only mount, a full disk
        return f"it is not writable ({exc.strerror})"
    return None


def problem(settings: Settings, name: str) -> str | None:
    """One line saying why folder setting ``name`` cannot work, or None when it can (its folder is made)."""
    path, shown = effective_path(settings, name)
    names_file = FOLDER_SETTINGS[name]
    why = _folder_problem(path.parent if names_file else path)
    if why is None and names_file and path.exists():
        if path.is_dir():
            why = "it is a folder, not a file"
        else:
            try:
                with open(path, "ab"):
                    pass
            except OSError as exc:
                why = f"the file is not writable ({exc.strerror})"
    elif why is not None and names_file:
        why = f"its folder {path.parent}: {why}"
    return None if why is None else f"{_env_name(name)}={shown}: {why}"


def check_folders(settings: Settings, names: Iterable[str]) -> None:
    """Create or check each folder setting of ``names``; ``UnusableFolder`` with the first that cannot work."""
    for name in names:
        if (why := problem(settings, name)) is not None:
            raise UnusableFolder(why)
