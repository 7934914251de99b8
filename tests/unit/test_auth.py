"""Bearer tokens: what verifies, what does not, and what each role may do."""
from __future__ import annotations

import pytest

from iotflow.auth import ROLES, Principal, issue, verify
from iotflow.errors import Forbidden, Unauthorized

SECRET = "s" * 32
CLAIMS = {"issuer": "iotflow", "audience": "iotflow-api"}


def _header(**overrides) -> str:
    args = {"role": "operator", "subject": "ops", "ttl_s": 60, **CLAIMS, **overrides}
    return "Bearer " + issue(overrides.pop("secret", SECRET), **{k: v for k, v in args.items() if k != "secret"})


def test_a_token_carries_its_subject_and_role():
    assert verify(SECRET, _header(), **CLAIMS) == Principal("ops", "operator")


@pytest.mark.parametrize(("header", "reason"), [
    (None, "no bearer token"),
    ("Basic abc", "expected `Authorization: Bearer"),
    ("Bearer ", "expected `Authorization: Bearer"),
    ("Bearer not.a.jwt", "not valid"),
])
def test_a_missing_or_malformed_header_is_unauthorized(header, reason):
    with pytest.raises(Unauthorized, match=reason):
        verify(SECRET, header, **CLAIMS)


@pytest.mark.parametrize("overrides", [
    {"secret": "t" * 32},  # signed with another key
    {"issuer": "someone-else"},
    {"audience": "another-api"},
])
def test_a_token_for_another_key_issuer_or_audience_is_refused(overrides):
    with pytest.raises(Unauthorized, match="not valid"):
        verify(SECRET, _header(**overrides), **CLAIMS)


def test_an_expired_token_is_refused_after_the_leeway():
    with pytest.raises(Unauthorized, match="expired"):
        verify(SECRET, _header(now=1_000_000), **CLAIMS)


def test_roles_include_the_ones_below():
    assert ROLES == ("viewer", "operator", "admin")
    Principal("a", "admin").require("viewer")
    Principal("o", "operator").require("operator")
    with pytest.raises(Forbidden, match="needs 'admin'"):
        Principal("o", "operator").require("admin")


def test_an_unknown_role_cannot_be_issued():
    with pytest.raises(ValueError, match="unknown role"):
        issue(SECRET, role="root", subject="x", ttl_s=60, **CLAIMS)
