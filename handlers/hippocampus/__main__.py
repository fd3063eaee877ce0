"""``python -m handlers.hippocampus STUDY_DIR ... --out DIR``: the batch command line (``cli.py``)."""

import sys

from handlers.hippocampus.cli import main

sys.exit(main())
