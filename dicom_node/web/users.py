"""People who use the web pages: accounts with a role, hashed passwords, login sessions.

Passwords are hashed with scrypt (stdlib, memory-hard) and a random salt per user; they
are never stored or logged. A session is a random token held in the browser's cookie;
the database keeps only its sha256, so a copy of the database cannot be used to log in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import delete, insert, select, update

from dicom_node.db import schema as t
from dicom_node.db.engine import Database

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 10


class Role(StrEnum):
    AUDITOR = "auditor"
    OPERATOR = "operator"


class UserError(ValueError):
    """A user-management request that cannot be done (message says why)."""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: Role
    disabled: bool


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
    )
    return hmac.compare_digest(candidate.hex(), digest)


# A fixed hash to compare against when the user does not exist, so a login for an unknown
# name takes as long as one with a wrong password (no user enumeration by timing).
_DUMMY_HASH = hash_password(secrets.token_hex(8))


class UserStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, username: str, role: str, password: str) -> User:
        if not _USERNAME.match(username):
            raise UserError(f"user name {username!r}: use 1-64 letters, digits or . _ @ -")
        try:
            role_value = Role(role)
        except ValueError:
            raise UserError(f"role {role!r}: choose {' or '.join(r.value for r in Role)}") from None
        if len(password) < MIN_PASSWORD:
            raise UserError(f"password too short: at least {MIN_PASSWORD} characters")
        with self.db.write() as conn:
            if conn.execute(select(t.users.c.id).where(t.users.c.username == username)).first():
                raise UserError(f"user {username!r} exists already")
            conn.execute(
                insert(t.users).values(
                    username=username,
                    role=role_value.value,
                    password_hash=hash_password(password),
                    created_at=time.time(),
                    disabled=False,
                )
            )
        user = self.get(username)
        assert user is not None
        return user

    def get(self, username: str) -> User | None:
        with self.db.read() as conn:
            row = conn.execute(select(t.users).where(t.users.c.username == username)).first()
        return User(row.id, row.username, Role(row.role), bool(row.disabled)) if row else None

    def list(self) -> list[User]:
        with self.db.read() as conn:
            rows = conn.execute(select(t.users).order_by(t.users.c.username)).all()
        return [User(r.id, r.username, Role(r.role), bool(r.disabled)) for r in rows]

    def set_password(self, username: str, password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise UserError(f"password too short: at least {MIN_PASSWORD} characters")
        with self.db.write() as conn:
            done = conn.execute(
                update(t.users)
                .where(t.users.c.username == username)
                .values(password_hash=hash_password(password))
            )
            if done.rowcount != 1:
                raise UserError(f"no user {username!r}")

    def disable(self, username: str) -> None:
        """Accounts are disabled, not deleted: the audit log keeps referring to them."""
        with self.db.write() as conn:
            row = conn.execute(select(t.users.c.id).where(t.users.c.username == username)).first()
            if row is None:
                raise UserError(f"no user {username!r}")
            conn.execute(update(t.users).where(t.users.c.id == row.id).values(disabled=True))
            conn.execute(delete(t.sessions).where(t.sessions.c.user_fk == row.id))

    def authenticate(self, username: str, password: str) -> User | None:
        with self.db.read() as conn:
            row = conn.execute(select(t.users).where(t.users.c.username == username)).first()
        if row is None:
            check_password(password, _DUMMY_HASH)
            return None
        if not check_password(password, row.password_hash) or row.disabled:
            return None
        return User(row.id, row.username, Role(row.role), False)

    # -- sessions ---------------------------------------------------------------------

    def open_session(self, user: User, hours: float) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.db.write() as conn:
            conn.execute(delete(t.sessions).where(t.sessions.c.expires_at < now))
            conn.execute(
                insert(t.sessions).values(
                    token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                    user_fk=user.id,
                    created_at=now,
                    expires_at=now + hours * 3600,
                )
            )
        return token

    def session_user(self, token: str | None) -> User | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.db.read() as conn:
            row = conn.execute(
                select(t.users)
                .join(t.sessions, t.sessions.c.user_fk == t.users.c.id)
                .where(t.sessions.c.token_sha256 == digest, t.sessions.c.expires_at > time.time())
            ).first()
        if row is None or row.disabled:
            return None
        return User(row.id, row.username, Role(row.role), False)

    def close_session(self, token: str | None) -> None:
        if not token:
            return
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.db.write() as conn:
            conn.execute(delete(t.sessions).where(t.sessions.c.token_sha256 == digest))
