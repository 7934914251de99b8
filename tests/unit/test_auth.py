"""Bearer tokens: what verifies, what does not, and what each role may do."""
from __future__ import annotations

import pytest

from iotflow.auth import ROLES, KeyRing, Principal, issue, verify
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


OLD, NEW = "o" * 32, "n" * 32


def test_after_a_rotation_old_tokens_stay_valid_until_their_key_is_retired():
    before = "Bearer " + issue(OLD, role="admin", subject="ci", ttl_s=600, kid="k1", **CLAIMS)
    after = "Bearer " + issue(NEW, role="viewer", subject="ops", ttl_s=600, kid="k2", **CLAIMS)
    rotated = KeyRing("k2", NEW, {"k1": OLD})
    assert verify(rotated, before, **CLAIMS) == Principal("ci", "admin")
    assert verify(rotated, after, **CLAIMS) == Principal("ops", "viewer")
    retired = KeyRing("k2", NEW, {})
    with pytest.raises(Unauthorized, match="signed with key 'k1', which is not \\(or no longer\\) accepted"):
        verify(retired, before, **CLAIMS)
    assert verify(retired, after, **CLAIMS) == Principal("ops", "viewer")


def test_a_token_naming_a_key_id_with_another_key_is_refused():
    # Claiming the current key id does not help a token signed with an old (or forged) key.
    forged = "Bearer " + issue(OLD, role="admin", subject="mallory", ttl_s=600, kid="k2", **CLAIMS)
    with pytest.raises(Unauthorized, match="Signature verification failed"):
        verify(KeyRing("k2", NEW, {"k1": OLD}), forged, **CLAIMS)


def test_a_token_without_a_key_id_is_checked_against_the_current_key():
    legacy = "Bearer " + issue(NEW, role="viewer", subject="ops", ttl_s=600, **CLAIMS)
    assert verify(KeyRing("k2", NEW, {"k1": OLD}), legacy, **CLAIMS) == Principal("ops", "viewer")
    with pytest.raises(Unauthorized):
        verify(KeyRing("k3", "x" * 32, {"k2": NEW}), legacy, **CLAIMS)


def test_a_key_ring_never_shows_its_secrets():
    assert OLD not in repr(KeyRing("k2", NEW, {"k1": OLD})) and NEW not in repr(KeyRing("k2", NEW, {}))
