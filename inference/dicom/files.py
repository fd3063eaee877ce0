"""Find a study's DICOM files: the files of a folder with the DICOM preamble, a request's study folder.

Used by the command lines, the DICOM node and the jobs that read a study from the data root.
"""

from __future__ import annotations

from pathlib import Path

from inference.errors import UnprocessableInput
from inference.paths import is_inside, resolve_inside, shown


def dicom_files_in(folder: Path, *, inside: Path | None = None) -> list[Path]:
    """Files below ``folder`` (recursively) that carry the DICOM preamble, sorted by path.

    With ``inside``, files that resolve outside that folder (symlinks out) are skipped unopened.
    """
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if inside is not None and not is_inside(inside, path):
            continue
        with open(path, "rb") as handle:
            head = handle.read(132)
        if head[128:132] == b"DICM":
            found.append(path)
    return found


def study_folder_files(root: Path | None, requested: str, *, field: str) -> list[Path]:
    """The DICOM files of folder ``requested`` of the data ``root``, as named by request ``field``.

    403 outside the root (``..``, absolute paths, symlinks); 422 for not a folder, an empty
    folder or one without DICOM files.
    """
    folder = resolve_inside(root, requested)
    try:
        if not folder.is_dir():
            raise UnprocessableInput(f"{field} {shown(requested)} is not a folder of the data root; "
                                     "give a folder of DICOM files")
        if not any(folder.iterdir()):
            raise UnprocessableInput(f"{field} {shown(requested)} is an empty folder; "
                                     "put the study's DICOM files in it")
        files = dicom_files_in(folder, inside=root)
    except OSError as exc:  # unreadable, or a name the file system refuses: its message holds server paths
        raise UnprocessableInput(f"{field} {shown(requested)} cannot be read on the server "
                                 f"({exc.strerror or 'I/O error'})") from None
    if not files:
        raise UnprocessableInput(f"{field} {shown(requested)} holds no DICOM files (none has the DICM preamble)")
    return files
