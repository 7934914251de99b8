"""Hostile telemetry payloads for the malformed-input storm (issue 7, scenario 9): plain logic, no I/O.

:func:`hostile_payloads` makes payloads that are invalid *by construction* — each strategy breaks
the contract of design.md in a way no luck can repair (a truncated JSON object is never a JSON
document; a field of the wrong type stays wrong whatever its value) — so that a storm test can
demand that every one of them ends in the DLQ or in a 4xx, and none is stored. Every payload is
distinct (a counter is part of it), so the DLQ can be matched against what was sent byte for byte.
tests/unit/test_fuzz.py checks each strategy against :func:`iotflow.telemetry.parse`.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable

_WRONG_TYPES: dict[str, list[object]] = {
    "device_id": [7, None, [], {}, True, 1.5],
    "msg_id": [7, None, [], {}, False],
    "seq": ["seven", None, [], {}, True, 1.5, -1, 2**64],
    "ts": [None, [], {}, True, 1.5, "yesterday", "2026-13-45T99:99:99Z"],
    "metrics": ["hot", None, [], 42, True, {"temp": "warm"}, {"temp": None}, {"bad name!": 1.0}, {"": 1.0}],
}


def _valid(device_id: str, number: int, now_ms: int) -> dict[str, object]:
    return {"device_id": device_id, "msg_id": f"storm-{number:08d}", "seq": number, "ts": now_ms,
            "metrics": {"temp": 20.5, "humidity": 40.0}}


def _random_bytes(rng: random.Random, good: dict, number: int) -> bytes:
    # A leading NUL is no JSON; the counter keeps each one distinct.
    return b"\x00" + number.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 200))


def _truncated(rng: random.Random, good: dict, number: int) -> bytes:
    text = json.dumps(good).encode()
    return text[:rng.randrange(1, len(text) - 1)]  # an object without its closing brace


def _invalid_utf8(rng: random.Random, good: dict, number: int) -> bytes:
    text = json.dumps(good).encode()
    at = text.index(b"storm-") + 6
    return text[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + text[at:]


def _wrong_type(rng: random.Random, good: dict, number: int) -> bytes:
    name = rng.choice(sorted(_WRONG_TYPES))
    return json.dumps({**good, name: rng.choice(_WRONG_TYPES[name])}).encode()


def _missing_field(rng: random.Random, good: dict, number: int) -> bytes:
    missing = rng.choice(["device_id", "seq", "ts", "metrics"])  # msg_id stays: it makes the payload distinct
    return json.dumps({k: v for k, v in good.items() if k != missing}).encode()


def _unknown_field(rng: random.Random, good: dict, number: int) -> bytes:
    return json.dumps({**good, rng.choice(["firmware", "__proto__", "extra", "Metrics"]): rng.random()}).encode()


def _not_an_object(rng: random.Random, good: dict, number: int) -> bytes:
    return json.dumps(rng.choice([[good], f"storm-{number}", number, [number, None], True])).encode()


def _deep_nesting(rng: random.Random, good: dict, number: int) -> bytes:
    depth = rng.randrange(50, 2000)
    return json.dumps({**good, "metrics": {"temp": 1.0}}).replace('1.0', "[" * depth + "1" + "]" * depth).encode()


def _not_finite(rng: random.Random, good: dict, number: int) -> bytes:
    text = json.dumps(good)
    return text.replace("20.5", rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])).encode()


def _oversized(rng: random.Random, good: dict, number: int) -> bytes:
    return json.dumps({**good, "metrics": {f"m{i}": float(i) for i in range(rng.randrange(300, 6000))}}).encode()


def _empty(rng: random.Random, good: dict, number: int) -> bytes:
    return rng.choice([b"", b" ", b"{}", b"null", b"\n\t"]) if number < 5 else _truncated(rng, good, number)


STRATEGIES: dict[str, Callable[[random.Random, dict, int], bytes]] = {
    "random_bytes": _random_bytes,
    "truncated": _truncated,
    "invalid_utf8": _invalid_utf8,
    "wrong_type": _wrong_type,
    "missing_field": _missing_field,
    "unknown_field": _unknown_field,
    "not_an_object": _not_an_object,
    "deep_nesting": _deep_nesting,
    "not_finite": _not_finite,
    "oversized": _oversized,
    "empty": _empty,
}


def hostile_payloads(device_ids: list[str], count: int, *, seed: int, now_ms: int,
                     first: int = 0) -> list[tuple[str, str, bytes]]:
    """``count`` hostile payloads as (device id, strategy, bytes), strategies and devices in turn,
    numbered from ``first`` (two storms with different ``first`` never share a payload)."""
    rng = random.Random(seed)
    names = sorted(STRATEGIES)
    out: list[tuple[str, str, bytes]] = []
    for i in range(count):
        number = first + i
        device = device_ids[i % len(device_ids)]
        name = names[i % len(names)]
        out.append((device, name, STRATEGIES[name](rng, _valid(device, number, now_ms), number)))
    return out
