"""API bearer tokens: HS256 JWTs carrying one role (plain logic, no I/O).

Roles are ordered — each includes the ones before it:

    viewer    read devices, their state and telemetry, the pipeline's accounting
    operator  and register and change devices, ingest over HTTP
    admin     and delete devices

A token names its subject (``sub``), its role, the issuer and audience it was made for, and when
it expires; all are checked. ``iotflow token --role …`` issues one with the configured secret.

Keys rotate with overlap: tokens are signed with the current key and name it in their header
(``kid``); the workers accept the current key and the previous ones still listed, each by its id,
so tokens issued before a rotation stay valid until their key is retired (removed from the list).
A token without ``kid`` (issued before key ids existed) is checked against the current key.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import jwt

from iotflow.errors import Forbidden, Unauthorized

ROLES = ("viewer", "operator", "admin")
_ALGORITHM = "HS256"
_LEEWAY_S = 30  # clock skew tolerated between the issuer and the workers


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str

    def require(self, needed: str) -> None:
        """Raise :class:`Forbidden` unless this principal's role includes ``needed``."""
        if ROLES.index(self.role) < ROLES.index(needed):
            raise Forbidden(self.subject, self.role, needed)


def issue(secret: str, *, role: str, subject: str, ttl_s: float, issuer: str, audience: str,
          now: float | None = None, kid: str | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    issued = int(now if now is not None else time.time())
    claims = {"sub": subject, "role": role, "iss": issuer, "aud": audience, "iat": issued,
              "exp": issued + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM, headers={"kid": kid} if kid else None)


@dataclass(frozen=True)
class KeyRing:
    """The key tokens are signed with (``current``, named ``current_kid``) and the previous keys still
    accepted, by key id."""

    current_kid: str
    current: str = field(repr=False)
    previous: Mapping[str, str] = field(repr=False)

    def for_kid(self, kid: object) -> str:
        if kid is None:
            return self.current
        if kid == self.current_kid:
            return self.current
        if isinstance(kid, str) and kid in self.previous:
            return self.previous[kid]
        raise Unauthorized(f"the token is signed with key {str(kid)[:40]!r}, which is not (or no longer) accepted")


def verify(keys: KeyRing | str, authorization: str | None, *, issuer: str, audience: str) -> Principal:
    """The principal of an ``Authorization: Bearer …`` header; :class:`Unauthorized` says why not.
    ``keys`` is a :class:`KeyRing`, or one secret (no key ids)."""
    if not authorization:
        raise Unauthorized("no bearer token: send `Authorization: Bearer <token>` (iotflow token --role viewer)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected `Authorization: Bearer <token>`")
    try:
        header = jwt.get_unverified_header(token.strip())
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"the token is not valid here: {exc}") from None
    secret = keys if isinstance(keys, str) else keys.for_kid(header.get("kid"))
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=[_ALGORITHM], issuer=issuer, audience=audience,
                            leeway=_LEEWAY_S, options={"require": ["sub", "exp", "iss", "aud"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"the token is not valid here: {exc}") from None
    role = claims.get("role")
    if role not in ROLES:
        raise Unauthorized(f"the token's role {role!r} is not one of {', '.join(ROLES)}")
    return Principal(str(claims["sub"]), role)
