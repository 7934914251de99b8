"""API bearer tokens: HS256 JWTs carrying one role (plain logic, no I/O).

Roles are ordered — each includes the ones before it:

    viewer    read devices, their state and telemetry, the pipeline's accounting
    operator  and register and change devices, ingest over HTTP
    admin     and delete devices

A token names its subject (``sub``), its role, the issuer and audience it was made for, and when
it expires; all are checked. ``iotflow token --role …`` issues one with the configured secret.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

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
          now: float | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    issued = int(now if now is not None else time.time())
    claims = {"sub": subject, "role": role, "iss": issuer, "aud": audience, "iat": issued,
              "exp": issued + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def verify(secret: str, authorization: str | None, *, issuer: str, audience: str) -> Principal:
    """The principal of an ``Authorization: Bearer …`` header; :class:`Unauthorized` says why not."""
    if not authorization:
        raise Unauthorized("no bearer token: send `Authorization: Bearer <token>` (iotflow token --role viewer)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected `Authorization: Bearer <token>`")
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
