"""Free space of the gateway's stores: a full filesystem is a 507 naming the store, not a 500.

A *store* is a folder setting the server writes to, named for clients and metrics: ``spool``
(INFERENCE_SPOOL_DIR), ``output`` (INFERENCE_OUTPUT_ROOT), ``pacs`` (INFERENCE_PACS_ROOT).
``check_free_space`` refuses before writing when the filesystem holds less than
INFERENCE_MIN_FREE_SPACE_MB; ``disk_full_as`` turns a write that still hits ENOSPC into the same error.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from inference.config import get_settings
from inference.errors import GatewayError

#: Store name -> the setting naming its folder (what an operator has to fix).
STORES = {"spool": "INFERENCE_SPOOL_DIR", "output": "INFERENCE_OUTPUT_ROOT", "pacs": "INFERENCE_PACS_ROOT"}

#: OSError numbers that mean the filesystem (or the user's quota) is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

MIB = 1024 * 1024


class StoreFull(GatewayError):
    """507 Insufficient Storage: the filesystem of ``store`` has no room for what the request must keep.

    Its JSON body names the store (``{"error": ..., "store": "spool"}``); the job records fail with its message.
    """

    status = 507

    def __init__(self, store: str, free_bytes: int | None = None, min_free_bytes: int | None = None) -> None:
        setting = STORES.get(store, "its folder setting")
        if free_bytes is None:
            detail = "the filesystem is full"
        else:
            detail = f"{free_bytes // MIB} MiB free, below the {(min_free_bytes or 0) // MIB} MiB kept free"
        super().__init__(f"insufficient storage: the {store} store ({setting}) is full: {detail}; "
                         "retry once the operator has made room", store=store)
        self.store = store
        self.free_bytes = free_bytes


def free_space_bytes(folder: Path) -> int:
    """Bytes free to this user on the filesystem holding ``folder`` (its nearest existing parent when absent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def min_free_bytes() -> int:
    """INFERENCE_MIN_FREE_SPACE_MB in bytes."""
    return get_settings().min_free_space_mb * MIB


def check_free_space(store: str, folder: Path, min_free_mb: int | None = None) -> int:
    """Raise ``StoreFull`` when ``folder``'s filesystem has less than ``min_free_mb`` MiB free (default
    INFERENCE_MIN_FREE_SPACE_MB); otherwise return the free bytes."""
    floor = min_free_bytes() if min_free_mb is None else min_free_mb * MIB
    free = free_space_bytes(folder)
    if free < floor:
        raise StoreFull(store, free, floor)
    return free


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a write refused for want of space."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, StoreFull) or (isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def disk_full_as(store: str) -> Iterator[None]:
    """Re-raise an ENOSPC/EDQUOT ``OSError`` from the block as ``StoreFull(store)``."""
    try:
        yield
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise StoreFull(store) from error
        raise


def store_of(error: BaseException, folders: Mapping[str, Path]) -> str:
    """The store a disk-full ``error`` hit: the one whose folder holds the file it names, else the one of
    ``folders`` with the least free space (the full one, in practice)."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, StoreFull):
            return current.store
        filename = getattr(current, "filename", None)
        if filename:
            path = Path(os.fsdecode(filename)).absolute()
            for store, folder in folders.items():
                if path.is_relative_to(Path(folder).absolute()):
                    return store
        current = current.__cause__ or current.__context__
    return min(folders, key=lambda store: free_space_bytes(folders[store]))


def low_stores(folders: Mapping[str, Path], min_free_mb: int | None = None) -> dict[str, str]:
    """Store -> why, for each of ``folders`` whose filesystem has less than ``min_free_mb`` MiB free."""
    low = {}
    for store, folder in folders.items():
        try:
            check_free_space(store, folder, min_free_mb)
        except StoreFull as full:
            low[store] = full.message
        except OSError as exc:
            low[store] = f"the {store} store ({STORES.get(store, store)}) cannot be checked: {exc.strerror}"
    return low


def with_storage(status: str, folders: Mapping[str, Path], min_free_mb: int | None = None) -> str:
    """A healthcheck text (``READY``, ``DEGRADED: ...``, ``FAILED: ...``) with the low stores added: READY
    becomes DEGRADED while any of ``folders`` is below the free-space floor."""
    low = low_stores(folders, min_free_mb)
    if not low:
        return status
    reasons = "; ".join(low.values())
    return f"DEGRADED: {reasons}" if status == "READY" else f"{status}; {reasons}"
