"""``python -m inference.audit verify [PATH]``: check the audit trail's hash chain; exit 1 naming the first bad line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from inference.audit import audit_log, verify
from inference.config import get_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit status (0 intact, 1 broken or missing)."""
    parser = argparse.ArgumentParser(prog="python -m inference.audit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the hash chain of the audit trail")
    check.add_argument("path", nargs="?", help="the audit file (default: INFERENCE_AUDIT_LOG's)")
    args = parser.parse_args(argv)
    path = args.path or audit_log(get_settings()).path
    try:
        count, problem = verify(path)
    except FileNotFoundError:
        print(f"{path}: no audit trail there", file=sys.stderr)
        return 1
    if problem is not None:
        print(f"{path}: line {count}: {problem}", file=sys.stderr)
        return 1
    print(f"{path}: {count} records, chain intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
