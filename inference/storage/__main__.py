"""``inference-migrate`` (``python -m inference.storage``): bring the stores of the current settings
(``INFERENCE_JOB_BACKEND``, ``INFERENCE_OUTPUT_ROOT``, ``INFERENCE_BROKER_URL``, ``INFERENCE_HISTORY_DB``) to this
release's schema versions. Stop the API, the workers and the DICOM node first."""

from __future__ import annotations

import argparse
import sys

from inference.config import get_settings
from inference.storage.backend import backend_for
from inference.storage.migrations import StoreVersionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.storage", description=__doc__)
    parser.parse_args(argv)
    try:
        for line in backend_for(get_settings()).migrate():
            print(line)
    except StoreVersionError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
