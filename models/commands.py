"""Console-script entry points (pyproject.toml) for the model commands whose ``main`` returns its figures.

``python -m models.evaluate`` and ``python -m models.train_hippocampus`` return a dict of metrics from
``main`` (tests and notebooks use it); a console script passes ``main``'s return value to ``sys.exit``,
which would print the dict and exit 1. These wrappers run the same ``main`` and exit 0.
"""

from __future__ import annotations

from collections.abc import Sequence


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``inference-evaluate``: the same as ``python -m models.evaluate``."""
    from models.evaluate import main

    main(list(argv) if argv is not None else None)
    return 0


def train(argv: Sequence[str] | None = None) -> int:
    """``inference-train``: the same as ``python -m models.train_hippocampus``."""
    from models.train_hippocampus import main

    main(list(argv) if argv is not None else None)
    return 0
