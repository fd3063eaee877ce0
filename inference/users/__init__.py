"""Named users, each with a role and a bearer token of their own, kept on the job store.

A token is ``<id>.<secret>``: the id finds the user, the secret is checked against a salted scrypt hash
(the token itself is never stored, and shown only once, by ``python -m inference.users add``). Roles
rank: ``submitter`` < ``reviewer`` < ``admin``; a user may do what its role and every lower role may.
``UserStore`` is the one interface; ``SqliteUsers`` keeps users in the local job store's SQLite file,
``RedisUsers`` in the celery backend's Redis, so every API instance sees the same users.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from inference.storage.backend import REDIS, Backend
from inference.storage.migrations import JOBS, open_sqlite, redis_prefix
from inference.storage.redis_client import client_for, reaching
from inference.storage.sqlite import connection

SUBMITTER, REVIEWER, ADMIN = "submitter", "reviewer", "admin"
#: Roles, lowest first: each may do what the ones before it may.
ROLES = (SUBMITTER, REVIEWER, ADMIN)
#: scrypt's cost (n, r, p): about 16 MiB and tens of milliseconds per check; a verified token is
#: remembered by its SHA-256 for the process's life, so a request pays it once.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


#: What an unknown or revoked id's secret is checked against, at a known id's cost.
UNKNOWN_ID_SALT = bytes(16)
UNKNOWN_ID_HASH = "0" * 128


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may use a route that needs ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


def hash_secret(secret: str, salt: bytes) -> str:
    """The salted scrypt hash (hex) of a token's secret."""
    return hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).hex()


@dataclass
class User:
    """One user: name, role, the public id of its token, the token's salt and hash, and when revoked."""

    name: str
    role: str
    token_id: str
    salt: str
    token_hash: str
    created: float
    revoked: float | None = None

    def describe(self) -> dict:
        """What ``list`` shows: never the salt or hash."""
        return {"name": self.name, "role": self.role, "created": self.created, "revoked": self.revoked}

    def to_row(self) -> dict[str, Any]:
        """The user as the users table's row by column (``COLUMNS``), and its Redis hash's fields."""
        return {"name": self.name, "role": self.role, "token_id": self.token_id, "salt": self.salt,
                "token_hash": self.token_hash, "created": self.created, "revoked": self.revoked}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> User:
        """The user of a stored row: the fields this release knows (a Redis hash's values are text)."""
        revoked = row.get("revoked")
        return cls(name=row["name"], role=row["role"], token_id=row["token_id"], salt=row["salt"],
                   token_hash=row["token_hash"], created=float(row["created"]),
                   revoked=float(revoked) if revoked not in (None, "") else None)


#: The users table's columns (``inference.storage.migrations.JOBS`` makes them).
COLUMNS = ("name", "role", "token_id", "salt", "token_hash", "created", "revoked")


def new_user(name: str, role: str) -> tuple[User, str]:
    """A new user and its token (to show once): a clear ValueError for a bad name or role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or not all(c.isalnum() or c in "-_.@" for c in name) or len(name) > 64:
        raise ValueError(f"a user name is 1-64 letters, digits or '-_.@', got {name!r}")
    token_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
    user = User(name, role, token_id, salt.hex(), hash_secret(secret, salt), time.time())
    return user, f"{token_id}.{secret}"


class UserStore(Protocol):
    """Where users are kept: the job store's SQLite file or its Redis."""

    def add(self, user: User) -> None:
        """Record a new user; ValueError when the name is taken (revoked names stay taken)."""
        ...

    def get(self, name: str) -> User | None:
        """User ``name``, or None."""
        ...

    def by_token_id(self, token_id: str) -> User | None:
        """The user whose token has the public id ``token_id``, or None."""
        ...

    def all(self) -> list[User]:
        """Every user, revoked ones included, by name."""
        ...

    def revoke(self, name: str) -> bool:
        """Revoke user ``name``'s token for good; whether it was active."""
        ...

    def any_users(self) -> bool:
        """Whether a user was ever created, revoked or not: then the server asks every request for a token
        (revoking the last user must not open the server)."""
        ...


class SqliteUsers:
    """Users in a table of the local job store's SQLite file (``<INFERENCE_OUTPUT_ROOT>/jobs.sqlite3``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: sqlite3.Connection | None = None
        self._reader_pid = 0
        self._reader_lock = threading.Lock()
        open_sqlite(self.path, JOBS)  # created at this release's schema, or refused at another one

    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, write=write)

    def _one(self, where: str, value: str) -> User | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM users WHERE {where} = ?", (value,)).fetchone()
        return None if row is None else User.from_row(dict(row))

    def add(self, user: User) -> None:
        try:
            with self._connect(write=True) as db:
                db.execute(f"INSERT INTO users ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)})",
                           user.to_row())
        except sqlite3.IntegrityError:
            raise ValueError(f"user {user.name!r} already exists (revoked names stay taken)") from None

    def get(self, name: str) -> User | None:
        return self._one("name", name)

    def by_token_id(self, token_id: str) -> User | None:
        return self._one("token_id", token_id)

    def all(self) -> list[User]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM users ORDER BY name").fetchall()
        return [User.from_row(dict(row)) for row in rows]

    def revoke(self, name: str) -> bool:
        with self._connect(write=True) as db:
            cursor = db.execute("UPDATE users SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name))
        return cursor.rowcount == 1

    def any_users(self) -> bool:
        # asked on every request while the server has no user: one connection per process is kept for it
        # (opening one costs more than the query); each statement reads the latest committed state
        with self._reader_lock:
            if self._reader is None or self._reader_pid != os.getpid():
                self._reader = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
                self._reader_pid = os.getpid()
            return self._reader.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None


class RedisUsers:
    """Users in the celery backend's Redis: hash ``inference:user:<name>``, index ``inference:user-token:<id>``,
    sets of every name and of the active ones."""

    PREFIX, TOKEN_PREFIX = redis_prefix() + "user:", redis_prefix() + "user-token:"
    ALL, ACTIVE = redis_prefix() + "users", redis_prefix() + "users-active"

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = client_for(url)

    def _reaching(self) -> contextlib.AbstractContextManager[None]:
        return reaching(self.redis, "user store")

    def _load(self, values: dict[bytes, bytes]) -> User | None:
        if not values:
            return None
        return User.from_row({key.decode(): value.decode() for key, value in values.items()})

    def add(self, user: User) -> None:
        values = {key: "" if value is None else str(value) for key, value in user.to_row().items()}
        with self._reaching():
            if not self.redis.hsetnx(self.PREFIX + user.name, "name", user.name):
                raise ValueError(f"user {user.name!r} already exists (revoked names stay taken)")
            pipe = self.redis.pipeline()
            pipe.hset(self.PREFIX + user.name, mapping=values)
            pipe.set(self.TOKEN_PREFIX + user.token_id, user.name)
            pipe.sadd(self.ACTIVE, user.name)
            pipe.sadd(self.ALL, user.name)
            pipe.execute()

    def get(self, name: str) -> User | None:
        with self._reaching():
            # redis-py types its sync and asyncio clients as one: this (sync) client answers plain values
            return self._load(cast("dict[bytes, bytes]", self.redis.hgetall(self.PREFIX + name)))

    def by_token_id(self, token_id: str) -> User | None:
        with self._reaching():
            name = cast("bytes | None", self.redis.get(self.TOKEN_PREFIX + token_id))
            return None if name is None else self._load(
                cast("dict[bytes, bytes]", self.redis.hgetall(self.PREFIX + name.decode())))

    def all(self) -> list[User]:
        with self._reaching():
            names = sorted(name.decode() for name in cast("set[bytes]", self.redis.smembers(self.ALL)))
        return [user for user in map(self.get, names) if user is not None]

    def revoke(self, name: str) -> bool:
        with self._reaching():
            if not self.redis.srem(self.ACTIVE, name):
                return False
            self.redis.hset(self.PREFIX + name, "revoked", str(time.time()))
        return True

    def any_users(self) -> bool:
        with self._reaching():
            return bool(self.redis.scard(self.ALL))


class Authenticator:
    """Finds the user a bearer token belongs to; remembers verified tokens by SHA-256 (never the token)."""

    def __init__(self, store: UserStore) -> None:
        self.store = store
        self._verified: dict[str, str] = {}  # SHA-256 of a token -> the scrypt hash it matched
        self._guard = threading.Lock()
        self._had_users = False

    def any_users(self) -> bool:
        """The store's ``any_users``, remembered once true: users are revoked, never deleted, so the
        answer cannot go back to false (one store query per request saved)."""
        if not self._had_users:
            self._had_users = self.store.any_users()
        return self._had_users

    def user_for(self, token: str) -> User | None:
        """The active user holding ``token``, else None (unknown, malformed or revoked)."""
        token_id, _, secret = token.partition(".")
        if not token_id or not secret:
            return None
        user = self.store.by_token_id(token_id)
        if user is None or user.revoked is not None:
            # the same scrypt as a known id: the answer's time tells nothing about which ids exist
            hmac.compare_digest(hash_secret(secret, UNKNOWN_ID_SALT), UNKNOWN_ID_HASH)
            return None
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        with self._guard:
            known = self._verified.get(key)
        if known is not None and hmac.compare_digest(known, user.token_hash):
            return user
        given = hash_secret(secret, bytes.fromhex(user.salt))
        if not hmac.compare_digest(given, user.token_hash):
            return None
        with self._guard:
            self._verified[key] = user.token_hash
        return user


def user_store(backend: Backend) -> UserStore:
    """The users of ``backend``, beside its jobs: Redis with the celery backend, else the job file."""
    if backend.kind == REDIS:
        return RedisUsers(backend.url)
    return SqliteUsers(backend.folder / "jobs.sqlite3")
