"""``/api/v1/openapi.json``: the OpenAPI 3.1 document of exactly the API this worker serves.

tests/unit/test_openapi.py checks that its operations are the routes the app registers under
``/api/v1`` (no more, no fewer); tests/integration/test_openapi.py drives the running API from it
with schemathesis and finds no 5xx.
"""
from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from iotflow.devices import FIRMWARE_VERSION, MAX_NAME, MAX_PAGE, MAX_TAGS, STATUSES, TAG, TYPE
from iotflow.firmware import MAX_SIZE_BYTES
from iotflow.maintenance import DAYS, MAX_WINDOWS
from iotflow.rollouts import MAX_TARGET_IDS, MAX_WAVES, ROLLOUT_STATUSES
from iotflow.telemetry import DEVICE_ID, METRIC

PATH = "/api/v1/openapi.json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


_PROBLEMS = {
    "401": _problem("no valid bearer token"),
    "403": _problem("the token's role does not allow this"),
    "413": _problem("the request body is larger than IOTFLOW_API_MAX_BODY_BYTES"),
    "422": _problem("invalid request: every bad field named"),
    "429": _problem("too many mutating requests for this token's subject; retry after Retry-After seconds"),
    "503": _problem("a database is not answering, or a table's owner is not known yet; retry after Retry-After seconds"),
}
_DEVICE_ID = {"name": "device_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": f"^{DEVICE_ID.pattern}$"}}
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": r'^(W/)?"?[1-9][0-9]{0,8}"?$'},
             "description": "the device version the change is made against"}
_CLOCK = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$",
          "description": "local time of day, HH:MM or HH:MM:SS"}
_TAGS = {"type": "array", "maxItems": MAX_TAGS, "items": {"type": "string", "pattern": f"^{TAG.pattern}$"}}
_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME,
             "pattern": r"^[^\u0000-\u001f\u007f]*[^\s\u0000-\u001f\u007f][^\u0000-\u001f\u007f]*$"},
    "type": {"type": "string", "pattern": f"^{TYPE.pattern}$"},
    "tags": _TAGS,
    "firmware_version": {"type": ["string", "null"], "pattern": f"^{FIRMWARE_VERSION.pattern}$"},
    "status": {"enum": list(STATUSES)},
}

_FIRMWARE_FIELDS: dict[str, Any] = {
    "version": {"type": "string", "pattern": f"^{FIRMWARE_VERSION.pattern}$"},
    "url": {"type": "string", "pattern": r"^https?://[^\s\u0000-\u001f\u007f]{1,2040}$"},
    "size_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_SIZE_BYTES},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}


def document() -> dict[str, Any]:
    device_ops = {
        "get": {"summary": "List live devices (filters, keyset cursor pages)", "security": [{"bearer": []}],
                "parameters": [
                    {"name": "type", "in": "query", "schema": _FIELDS["type"]},
                    {"name": "status", "in": "query", "schema": _FIELDS["status"]},
                    {"name": "firmware_version", "in": "query",
                     "schema": {"type": "string", "pattern": f"^{FIRMWARE_VERSION.pattern}$"}},
                    {"name": "tag", "in": "query", "schema": _TAGS, "style": "form", "explode": True},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {"name": "q", "in": "query", "description": "a piece of the id or the name, any case",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                ],
                "responses": {"200": _json(_ref("DevicePage"), "one page"), **_PROBLEMS}},
        "post": {"summary": "Register a device (the same registration again changes nothing)",
                 "security": [{"bearer": []}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Registration")}}},
                 "responses": {"201": _json(_ref("RegisteredDevice"), "registered: its MQTT password, shown once"),
                               "200": _json(_ref("Device"), "already so"),
                               "409": _problem("registered with other values, or deleted"), **_PROBLEMS}},
    }
    one_ops = {
        "get": {"summary": "One device (cached)", "security": [{"bearer": []}], "parameters": [_DEVICE_ID],
                "responses": {"200": _json(_ref("Device"), "the device"), "404": _problem("unknown or deleted"),
                              **_PROBLEMS}},
        "patch": {"summary": "Change a device", "security": [{"bearer": []}], "parameters": [_DEVICE_ID, _IF_MATCH],
                  "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Change")}}},
                  "responses": {"200": _json(_ref("Device"), "changed"), "404": _problem("unknown or deleted"),
                                "412": _problem("If-Match names another version"), **_PROBLEMS}},
        "delete": {"summary": "Soft-delete a device", "security": [{"bearer": []}],
                   "parameters": [_DEVICE_ID, _IF_MATCH],
                   "responses": {"200": _json(_ref("Device"), "deleted"), "404": _problem("unknown or deleted"),
                                 "412": _problem("If-Match names another version"), **_PROBLEMS}},
    }
    mqtt_unavailable = {"503": _problem("a database or the MQTT broker's credential manager is not answering; "
                                        "retry after Retry-After seconds")}
    one_ops["delete"]["responses"].update(mqtt_unavailable)
    device_ops["post"]["responses"].update(mqtt_unavailable)
    credentials = {
        "get": {"summary": "Whether the device's MQTT account is active, revoked or missing",
                "security": [{"bearer": []}], "parameters": [_DEVICE_ID],
                "responses": {"200": _json({"type": "object", "required": ["device_id", "status"], "properties": {
                    "device_id": {"type": "string"}, "status": {"enum": ["active", "revoked", "none"]}}}, "its status"),
                    "404": _problem("unknown or deleted"), **_PROBLEMS, **mqtt_unavailable}},
        "post": {"summary": "A new MQTT password (the old one stops working, its connections are closed)",
                 "security": [{"bearer": []}], "parameters": [_DEVICE_ID],
                 "responses": {"200": _json({"type": "object", "required": ["device_id", "mqtt"], "properties": {
                     "device_id": {"type": "string"}, "mqtt": _ref("MqttCredentials")}}, "the new password, shown once"),
                     "404": _problem("unknown or deleted"), **_PROBLEMS, **mqtt_unavailable}},
        "delete": {"summary": "Revoke the device's MQTT account (disabled, connection closed)",
                   "security": [{"bearer": []}], "parameters": [_DEVICE_ID],
                   "responses": {"200": _json({"type": "object", "required": ["device_id", "status"], "properties": {
                       "device_id": {"type": "string"}, "status": {"enum": ["revoked", "none"]}}}, "revoked"),
                       "404": _problem("unknown or deleted"), **_PROBLEMS, **mqtt_unavailable}},
    }
    telemetry = {"get": {
        "summary": "Time-bucketed aggregates of a device's measurements", "security": [{"bearer": []}],
        "parameters": [
            _DEVICE_ID,
            {"name": "metric", "in": "query", "schema": {"type": "string", "pattern": f"^{METRIC.pattern}$"}},
            {"name": "from", "in": "query", "schema": {"type": "string", "format": "date-time"}},
            {"name": "to", "in": "query", "schema": {"type": "string", "format": "date-time"}},
            {"name": "bucket", "in": "query", "schema": {"type": "string", "pattern": r"^[1-9][0-9]{0,5}(s|m|h|d)$"}},
        ],
        "responses": {"200": _json({"type": "object"}, "buckets"), "404": _problem("unknown or deleted"),
                      **_PROBLEMS}}}
    state = {"get": {"summary": "A device as the worker tables hold it (routed to the owner)",
                     "security": [{"bearer": []}], "parameters": [_DEVICE_ID],
                     "responses": {"200": _json({"type": "object"}, "the state"),
                                   "404": _problem("no event applied yet"), **_PROBLEMS}}}
    ingest = {"post": {"summary": "Telemetry over HTTP (all or nothing)", "security": [{"bearer": []}],
                       "requestBody": {"required": True, "content": {"application/json": {
                           "schema": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"type": "object"}}}}},
                       "responses": {"202": _json({"type": "object"}, "Kafka has every item"),
                                     "400": _problem("not a JSON array"), "413": _problem("too many items"),
                                     **_PROBLEMS}}}
    accounting = {"get": {"summary": "Fleet accounting (every worker's devices)", "security": [{"bearer": []}],
                          "parameters": [{"name": "scope", "in": "query", "schema": {"enum": ["local"]}}],
                          "responses": {"200": _json({"type": "object"}, "totals"), **_PROBLEMS}}}
    device_accounting = {"get": {"summary": "One device's accounting", "security": [{"bearer": []}],
                                 "parameters": [_DEVICE_ID],
                                 "responses": {"200": _json({"type": "object"}, "the account"), **_PROBLEMS}}}
    version_param = {"name": "version", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": f"^{FIRMWARE_VERSION.pattern}$"}}
    firmware_list = {
        "get": {"summary": "The firmware catalogue, by version (keyset pages)", "security": [{"bearer": []}],
                "parameters": [{"name": "after", "in": "query", "schema": version_param["schema"]}],
                "responses": {"200": _json({"type": "object"}, "a page of versions"), **_PROBLEMS}},
        "post": {"summary": "Publish a firmware version (the same again is not an error)", "security": [{"bearer": []}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("FirmwareRelease")}}},
                 "responses": {"201": _json(_ref("Firmware"), "published"), "200": _json(_ref("Firmware"), "as published"),
                               "409": _problem("published with other values"), **_PROBLEMS}}}
    firmware_one = {"get": {"summary": "One firmware version", "security": [{"bearer": []}], "parameters": [version_param],
                            "responses": {"200": _json(_ref("Firmware"), "the version"), "404": _problem("unknown"),
                                          **_PROBLEMS}}}
    rollouts = {
        "post": {"summary": "Create a rollout (once per Idempotency-Key)", "security": [{"bearer": []}],
                 "parameters": [{"name": "Idempotency-Key", "in": "header", "required": True,
                                 "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"}}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RolloutRequest")}}},
                 "responses": {"201": _json(_ref("Rollout"), "created, targets resolved and planned in waves"),
                               "200": _json(_ref("Rollout"), "the rollout this key created before"),
                               **_PROBLEMS}},
        "get": {"summary": "The newest rollouts", "security": [{"bearer": []}],
                "parameters": [{"name": "status", "in": "query", "schema": {"enum": list(ROLLOUT_STATUSES)}}],
                "responses": {"200": _json({"type": "object"}, "rollouts"), **_PROBLEMS}}}
    one_rollout = {"get": {"summary": "A rollout with its devices counted per state and per wave",
                           "security": [{"bearer": []}],
                           "parameters": [{"name": "rollout_id", "in": "path", "required": True,
                                           "schema": {"type": "string"}}],
                           "responses": {"200": _json(_ref("Rollout"), "the rollout"), "404": _problem("unknown"),
                                         **_PROBLEMS}}}
    rollout_param = {"name": "rollout_id", "in": "path", "required": True, "schema": {"type": "string"}}
    rollout_progress = {"get": {
        "summary": "A rollout's latest progress snapshot from the rollout-progress table (routed to its owner)",
        "security": [{"bearer": []}],
        "parameters": [{"name": "rollout_id", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": f"^{DEVICE_ID.pattern}$"}}],
        "responses": {"200": _json({"type": "object"}, "counts per state and per wave, and when they were counted"),
                      "404": _problem("no snapshot in the table"), **_PROBLEMS}}}
    rollout_actions = {
        f"/api/v1/firmware/rollouts/{{rollout_id}}/{action}": {"post": {
            "summary": summary, "security": [{"bearer": []}], "parameters": [rollout_param],
            "responses": {"200": _json(_ref("Rollout"), "the rollout after the action (unchanged if it already held)"),
                          "404": _problem("unknown"), "409": _problem("not possible in the rollout's status"),
                          **_PROBLEMS}}}
        for action, summary in (("pause", "Pause: no more commands (devices already commanded go on)"),
                                ("resume", "Resume a paused rollout where it stopped"),
                                ("cancel", "Cancel: devices not yet commanded are CANCELED"))}
    rollback = {"post": {"summary": "Roll back: a rollout of the previous version to the devices that took this one "
                                    "(one per rollout; the original is canceled if still going)",
                         "security": [{"bearer": []}], "parameters": [rollout_param],
                         "responses": {"201": _json(_ref("Rollout"), "the rollback rollout"),
                                       "200": _json(_ref("Rollout"), "the rollback created before"),
                                       "404": _problem("unknown"), "409": _problem("no device succeeded in it"),
                                       **_PROBLEMS}}}
    text_param = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"}
    audit_log = {"get": {
        "summary": "The audit log (admin): mutating calls that changed something, newest first",
        "security": [{"bearer": []}],
        "parameters": [*({"name": n, "in": "query", "schema": text_param} for n in ("actor", "action", "target_type", "target_id")),
                       {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
        "responses": {"200": _json({"type": "object"}, "items (id, at, actor, role, action, target_type, target_id, "
                                                      "request_id, details) and next_before"), **_PROBLEMS}}}
    flag_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    flags = {"get": {"summary": "Feature flags", "security": [{"bearer": []}],
                     "responses": {"200": _json({"type": "object"}, "every flag"), **_PROBLEMS}}}
    one_flag = {"get": {"summary": "One feature flag", "security": [{"bearer": []}], "parameters": [flag_param],
                        "responses": {"200": _json(_ref("Flag"), "the flag"), "404": _problem("unknown"), **_PROBLEMS}},
                "put": {"summary": "Set a feature flag (admin); rollouts.kill_switch on stops every rollout's dispatch",
                        "security": [{"bearer": []}], "parameters": [flag_param],
                        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("FlagSetting")}}},
                        "responses": {"200": _json(_ref("Flag"), "the flag as set"), **_PROBLEMS}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "iotflow", "version": "1", "description": "Device management and pipeline API "
                 "served by every iotflow worker. Errors are RFC 7807 problem+json with a request_id."},
        "paths": {
            "/api/v1/devices": device_ops,
            "/api/v1/devices/{device_id}": one_ops,
            "/api/v1/devices/{device_id}/credentials": credentials,
            "/api/v1/devices/{device_id}/telemetry": telemetry,
            "/api/v1/devices/{device_id}/state": state,
            "/api/v1/devices/{device_id}/firmware": {"get": {
                "summary": "The device's rollout executions, newest first", "security": [{"bearer": []}],
                "parameters": [_DEVICE_ID],
                "responses": {"200": _json({"type": "object"}, "items"), "404": _problem("unknown or deleted"),
                              **_PROBLEMS}}},
            "/api/v1/fleet/summary": {"get": {
                "summary": "Devices live, online, offline and deleted", "security": [{"bearer": []}],
                "responses": {"200": _json({"type": "object"}, "the counts"), **_PROBLEMS}}},
            "/api/v1/ingest": ingest,
            "/api/v1/firmware": firmware_list,
            "/api/v1/firmware/rollouts": rollouts,
            "/api/v1/firmware/rollouts/{rollout_id}": one_rollout,
            "/api/v1/firmware/rollouts/{rollout_id}/progress": rollout_progress,
            **rollout_actions,
            "/api/v1/firmware/rollouts/{rollout_id}/rollback": rollback,
            "/api/v1/flags": flags,
            "/api/v1/audit": audit_log,
            "/api/v1/flags/{name}": one_flag,
            "/api/v1/firmware/{version}": firmware_one,
            "/api/v1/pipeline/accounting": accounting,
            "/api/v1/pipeline/accounting/devices/{device_id}": device_accounting,
            PATH: {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "it")}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "RolloutRequest": {
                    "type": "object", "additionalProperties": False, "required": ["firmware", "targets"],
                    "properties": {
                        "firmware": _FIRMWARE_FIELDS["version"],
                        "targets": {"oneOf": [
                            {"type": "object", "additionalProperties": False, "required": ["devices"],
                             "properties": {"devices": {"type": "array", "minItems": 1, "maxItems": MAX_TARGET_IDS,
                                                        "items": _DEVICE_ID["schema"]}}},
                            {"type": "object", "additionalProperties": False, "required": ["filter"],
                             "properties": {"filter": {"type": "object", "additionalProperties": False, "minProperties": 1,
                                                       "properties": {"type": _FIELDS["type"],
                                                                      "tags": {**_TAGS, "minItems": 1},
                                                                      "firmware_version": _FIRMWARE_FIELDS["version"]}}}}]},
                        "waves": {"oneOf": [
                            {"type": "object", "additionalProperties": False, "required": ["percent"],
                             "properties": {"percent": {"type": "array", "minItems": 1, "maxItems": MAX_WAVES,
                                                        "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}}}},
                            {"type": "object", "additionalProperties": False, "required": ["sizes"],
                             "properties": {"sizes": {"type": "array", "minItems": 1, "maxItems": MAX_WAVES,
                                                      "items": {"type": "integer", "minimum": 1}}}}]},
                        "success_pct": {"type": "number", "minimum": 0, "maximum": 100},
                        "abort": {"type": "object", "additionalProperties": False, "properties": {
                            "failure_states": {"type": "array", "minItems": 1,
                                               "items": {"enum": ["FAILED", "TIMED_OUT", "REJECTED"]}},
                            "threshold_pct": {"type": "number", "minimum": 0, "maximum": 100},
                            "min_executed": {"type": "integer", "minimum": 1, "maximum": MAX_TARGET_IDS}}},
                        "device_timeout_s": {"type": "integer", "minimum": 10, "maximum": 7 * 86400},
                        "retries": {"type": "integer", "minimum": 0, "maximum": 10},
                        "dispatch_per_s": {"type": "number", "minimum": 0.1, "maximum": 10000},
                        "health_window_s": {"type": "integer", "minimum": 0, "maximum": 86400},
                        "start_at": {"type": ["string", "null"], "format": "date-time"},
                        "maintenance_windows": {
                            "type": "array", "minItems": 1, "maxItems": MAX_WINDOWS,
                            "description": "dispatch only inside one of these daily spans of local time "
                                           "(end before start spans midnight); none: at any time",
                            "items": {"type": "object", "additionalProperties": False, "required": ["start", "end"],
                                      "properties": {
                                          "start": _CLOCK, "end": _CLOCK,
                                          "days": {"type": "array", "minItems": 1, "uniqueItems": True,
                                                   "items": {"enum": list(DAYS)}},
                                          "timezone": {"type": "string", "description": "IANA name, default UTC",
                                                       "examples": ["Europe/Berlin"]}}}}}},
                "FlagSetting": {"type": "object", "additionalProperties": False, "required": ["enabled"],
                                "properties": {"enabled": {"type": "boolean"},
                                               "percentage": {"type": "integer", "minimum": 0, "maximum": 100}}},
                "Flag": {"type": "object", "required": ["name", "enabled", "percentage"],
                         "properties": {"name": {"type": "string"}, "enabled": {"type": "boolean"},
                                        "percentage": {"type": "integer"}, "updated_at": {"type": ["string", "null"]}}},
                "Rollout": {"type": "object", "required": ["id", "firmware_version", "status", "spec", "devices",
                                                           "by_state", "waves"],
                            "properties": {"id": {"type": "string"}, "firmware_version": {"type": "string"},
                                           "status": {"enum": list(ROLLOUT_STATUSES)}, "spec": {"type": "object"},
                                           "devices": {"type": "integer"}, "by_state": {"type": "object"},
                                           "current_wave": {"type": "integer"}, "unhealthy": {"type": "integer"},
                                           "rate_per_min": {"type": "number"}, "eta_s": {"type": ["integer", "null"]},
                                           "window_open": {"type": "boolean"},
                                           "next_window_at": {"type": ["string", "null"]},
                                           "waves": {"type": "array"}}},
                "FirmwareRelease": {"type": "object", "additionalProperties": False,
                                    "required": ["version", "url", "size_bytes", "sha256"],
                                    "properties": _FIRMWARE_FIELDS},
                "Firmware": {"type": "object", "required": ["version", "url", "size_bytes", "sha256", "created_at"],
                             "properties": {**_FIRMWARE_FIELDS, "created_at": {"type": ["string", "null"]}}},
                "Registration": {"type": "object", "additionalProperties": False,
                                 "required": ["id", "name", "type"],
                                 "properties": {"id": _DEVICE_ID["schema"], **_FIELDS}},
                "Change": {"type": "object", "additionalProperties": False, "minProperties": 1,
                           "properties": _FIELDS},
                "Device": {"type": "object", "required": ["id", "name", "type", "tags", "status", "version"],
                           "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                          "type": {"type": "string"}, "tags": {"type": "array"},
                                          "firmware_version": {"type": ["string", "null"]},
                                          "status": {"type": "string"}, "version": {"type": "integer"},
                                          "created_at": {"type": "string"}, "updated_at": {"type": "string"},
                                          "last_seen": {"type": ["string", "null"]},
                                          "deleted_at": {"type": ["string", "null"]}}},
                "MqttCredentials": {"type": "object", "required": ["url", "host", "port", "username", "client_id",
                                                                   "password"],
                                    "properties": {"url": {"type": "string"}, "host": {"type": "string"},
                                                   "port": {"type": "integer"}, "username": {"type": "string"},
                                                   "client_id": {"type": "string"}, "password": {"type": "string"}}},
                "RegisteredDevice": {"allOf": [_ref("Device"), {"type": "object", "required": ["mqtt"], "properties": {
                    "mqtt": _ref("MqttCredentials")}}]},
                "DevicePage": {"type": "object", "required": ["items", "next_cursor"],
                               "properties": {"items": {"type": "array", "items": _ref("Device")},
                                              "next_cursor": {"type": ["string", "null"]}}},
                "Problem": {"type": "object", "required": ["title", "status", "detail", "request_id"],
                            "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                           "status": {"type": "integer"}, "detail": {"type": "string"},
                                           "instance": {"type": "string"}, "request_id": {"type": "string"},
                                           "errors": {"type": "array"}}},
            },
        },
    }


def register(app: faust.App) -> None:
    served = document()

    @app.page(PATH)
    async def openapi(self: View, request: Request) -> Response:
        return self.json(served)
