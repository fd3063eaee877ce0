"""``python -m inference.users add NAME --role ROLE | list | revoke NAME``: manage the server's named users.

``add`` prints the new user's bearer token once (only its salted hash is kept); ``revoke`` ends it for good.
Both are written to the audit trail. Users live on the configured job store (SQLite or Redis).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence

from inference.audit import audit_log
from inference.config import get_settings
from inference.storage.backend import checked_backend
from inference.users import ROLES, new_user, user_store


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit status (0 done, 1 refused, 2 bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m inference.users", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a user and print its token once")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    commands.add_parser("list", help="list users (JSON lines: name, role, created, revoked)")
    revoke = commands.add_parser("revoke", help="revoke a user's token")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    settings = get_settings()
    store, audit = user_store(checked_backend(settings)), audit_log(settings)
    operator = f"cli:{getpass.getuser()}"
    if args.command == "add":
        try:
            user, token = new_user(args.name, args.role)
            store.add(user)
        except ValueError as exc:
            print(f"users add: {exc}", file=sys.stderr)
            return 1
        audit.append("user-created", user=operator, subject=user.name, role=user.role)
        print(token)
        print(f"user {user.name!r} ({user.role}) created; this token is shown only now", file=sys.stderr)
    elif args.command == "list":
        for user in store.all():
            print(json.dumps(user.describe()))
    else:
        if not store.revoke(args.name):
            print(f"users revoke: no active user {args.name!r}", file=sys.stderr)
            return 1
        audit.append("user-revoked", user=operator, subject=args.name)
        print(f"user {args.name!r} revoked", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
