"""RFC 7807 problem responses and the correlation id every response carries."""
from __future__ import annotations

import re
import uuid
from typing import Any

from collections.abc import Awaitable, Callable

import asyncpg
from faust.web import Request, Response, View

from iotflow.errors import (
    DeviceConflict,
    DeviceNotFound,
    FirmwareConflict,
    FlagNotFound,
    FirmwareNotFound,
    IdempotencyMismatch,
    InvalidRequest,
    MqttAuthError,
    RegistryUnavailable,
    RolloutConflict,
    RolloutNotFound,
    VersionMismatch,
)

HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_REQUEST_KEY = "iotflow_request_id"


def request_id(request: Request) -> str:
    """The caller's correlation id when it is a sane token, else a fresh one — the same for the
    whole request (kept on it: its log lines and its answer carry one id)."""
    known = request.get(_REQUEST_KEY)
    if known is None:
        given = request.headers.get(HEADER, "")
        known = request[_REQUEST_KEY] = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
    return known


def problem(view: View, request: Request, status: int, title: str, detail: str, **extra: Any) -> Response:
    rid = request_id(request)
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "instance": str(request.url.path), "request_id": rid, **extra}
    return view.json(body, status=status, content_type="application/problem+json", headers={HEADER: rid})


_RETRY_AFTER_S = 2


async def answer(view: View, request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
    """Run ``work``; map the management API's errors to problem+json answers."""
    try:
        return await work()
    except InvalidRequest as exc:
        return problem(view, request, 422, exc.title, str(exc), errors=exc.errors)
    except DeviceNotFound as exc:
        return problem(view, request, 404, "No such device", str(exc), device_id=exc.device_id)
    except DeviceConflict as exc:
        return problem(view, request, 409, "Device registered with other values", str(exc),
                       device_id=exc.device_id, fields=exc.fields)
    except FirmwareNotFound as exc:
        return problem(view, request, 404, "No such firmware", str(exc), version=exc.version)
    except FirmwareConflict as exc:
        return problem(view, request, 409, "Firmware published with other values", str(exc),
                       version=exc.version, fields=exc.fields)
    except IdempotencyMismatch as exc:
        return problem(view, request, 422, "Idempotency-Key reused with another request", str(exc),
                       rollout_id=exc.rollout_id)
    except RolloutNotFound as exc:
        return problem(view, request, 404, "No such rollout", str(exc), rollout_id=exc.rollout_id)
    except RolloutConflict as exc:
        return problem(view, request, 409, "Not possible in the rollout's status", str(exc),
                       rollout_id=exc.rollout_id, rollout_status=exc.status)
    except FlagNotFound as exc:
        return problem(view, request, 404, "No such flag", str(exc), name=exc.name)
    except VersionMismatch as exc:
        return problem(view, request, 412, "Device changed since it was read", str(exc),
                       device_id=exc.device_id, current_version=exc.current)
    except asyncpg.DataError as exc:
        # Validation should have caught it; if the database still refuses a value, say so (not 500).
        return problem(view, request, 422, "Value refused by the database", f"{exc.__class__.__name__}: {exc}")
    except RegistryUnavailable as exc:
        response = problem(view, request, 503, "Device registry unavailable", str(exc))
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
        return response
    except MqttAuthError as exc:
        response = problem(view, request, 503, "MQTT credential manager unavailable", str(exc))
        response.headers["Retry-After"] = str(_RETRY_AFTER_S)
        return response
