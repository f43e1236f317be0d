"""People who use the web pages and the REST API: accounts with a role, hashed passwords,
login sessions, API tokens.

Passwords are hashed with scrypt (stdlib, memory-hard) and a random salt per user; they
are never stored or logged. A session is a random token held in the browser's cookie;
the database keeps only its sha256, so a copy of the database cannot be used to log in.
An API token (for scripts and other systems) belongs to one user and acts with that
user's role; it is shown once when made, kept only as its sha256, and can be revoked or
given an expiry. Disabling a user revokes their tokens.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, insert, select, update

from dicom_node.db import schema as t
from dicom_node.db.engine import Database, inserted_id

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 10


class Role(StrEnum):
    AUDITOR = "auditor"
    OPERATOR = "operator"
    #: Stores instances over STOW-RS and nothing else (a modality, a PACS, a gateway); its
    #: user name is the calling AE title its instances are recorded (and routed) with.
    SENDER = "sender"


#: Every API token starts so (secret scanners and log filters can recognise one).
TOKEN_PREFIX = "dnt_"
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9 ._@:/-]{1,64}$")
#: ``last_used_at`` is written at most this often per token.
_LAST_USED_EVERY = 60.0


class UserError(ValueError):
    """A user-management request that cannot be done (message says why)."""


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: Role
    disabled: bool


@dataclass(frozen=True)
class ApiToken:
    id: int
    username: str
    name: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def state(self, now: float | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return "expired"
        return "active"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: API tokens with their user's name, role and whether the user is disabled.
_TOKEN_ROWS = select(t.api_tokens, t.users.c.username, t.users.c.role, t.users.c.disabled).join(
    t.users, t.users.c.id == t.api_tokens.c.user_fk
)


def _token(row: Any) -> ApiToken:
    return ApiToken(
        row.id, row.username, row.name, row.created_at, row.expires_at, row.revoked_at, row.last_used_at
    )


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
        if role_value == Role.SENDER and len(username) > 16:
            raise UserError(
                f"sender {username!r}: at most 16 characters (it is the AE title its instances carry)"
            )
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
            conn.execute(
                update(t.api_tokens)
                .where(t.api_tokens.c.user_fk == row.id, t.api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )

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
                    token_sha256=_digest(token),
                    user_fk=user.id,
                    created_at=now,
                    expires_at=now + hours * 3600,
                )
            )
        return token

    def session_user(self, token: str | None) -> User | None:
        if not token:
            return None
        digest = _digest(token)
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
        digest = _digest(token)
        with self.db.write() as conn:
            conn.execute(delete(t.sessions).where(t.sessions.c.token_sha256 == digest))

    # -- API tokens -------------------------------------------------------------------

    def create_token(self, username: str, name: str, days: float | None = None) -> tuple[ApiToken, str]:
        """A new token for ``username`` (valid ``days``, or until revoked): the record and
        the token itself, which is not kept and cannot be shown again."""
        if not _TOKEN_NAME.match(name):
            raise UserError(f"token name {name!r}: use 1-64 letters, digits, spaces or . _ @ : / -")
        if days is not None and not 0 < days <= 3650:
            raise UserError(f"token lifetime {days} days: choose more than 0 and at most 3650")
        user = self.get(username)
        if user is None:
            raise UserError(f"no user {username!r}")
        if user.disabled:
            raise UserError(f"user {username!r} is disabled")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires = now + days * 86400 if days is not None else None
        with self.db.write() as conn:
            token_id = inserted_id(
                conn.execute(
                    insert(t.api_tokens).values(
                        user_fk=user.id,
                        name=name,
                        token_sha256=_digest(token),
                        created_at=now,
                        expires_at=expires,
                    )
                )
            )
        return ApiToken(token_id, username, name, now, expires, None, None), token

    def tokens(self, username: str | None = None) -> builtins.list[ApiToken]:
        query = _TOKEN_ROWS.order_by(t.api_tokens.c.id)
        if username is not None:
            query = query.where(t.users.c.username == username)
        with self.db.read() as conn:
            return [_token(r) for r in conn.execute(query).all()]

    def revoke_token(self, token_id: int) -> ApiToken:
        with self.db.write() as conn:
            done = conn.execute(
                update(t.api_tokens)
                .where(t.api_tokens.c.id == token_id, t.api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = conn.execute(_TOKEN_ROWS.where(t.api_tokens.c.id == token_id)).first()
        if row is None:
            raise UserError(f"no API token {token_id}")
        if done.rowcount != 1:
            raise UserError(f"API token {token_id} was revoked already")
        return _token(row)

    def token_user(self, token: str) -> tuple[User, ApiToken] | None:
        """The user an API token acts for, and the token; None when it is unknown, revoked,
        expired, or its user is disabled."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        now = time.time()
        with self.db.read() as conn:
            row = conn.execute(_TOKEN_ROWS.where(t.api_tokens.c.token_sha256 == _digest(token))).first()
        if row is None or row.disabled:
            return None
        record = _token(row)
        if record.state(now) != "active":
            return None
        if row.last_used_at is None or row.last_used_at < now - _LAST_USED_EVERY:
            with self.db.write() as conn:
                conn.execute(update(t.api_tokens).where(t.api_tokens.c.id == row.id).values(last_used_at=now))
        return User(row.user_fk, row.username, Role(row.role), False), record
