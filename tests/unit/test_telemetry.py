from __future__ import annotations

import pytest

from iotflow.telemetry import InvalidPayload, device_id_of


def test_device_id_is_read_from_a_json_object():
    assert device_id_of(b'{"device_id": "dev-1", "seq": 3}') == "dev-1"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "payload"),
        (b"\xff\xfe", "payload"),
        (b"[1, 2]", "payload"),
        (b'{"seq": 1}', "device_id"),
        (b'{"device_id": ""}', "device_id"),
        (b'{"device_id": 7}', "device_id"),
    ],
)
def test_an_undecodable_payload_names_the_field(raw, field):
    with pytest.raises(InvalidPayload) as caught:
        device_id_of(raw)
    assert caught.value.field == field
    assert field in str(caught.value)
