"""The firmware catalogue's request checks (plain logic)."""
from __future__ import annotations

import json

import pytest

from iotflow.errors import InvalidRequest
from iotflow.firmware import parse_firmware

SHA = "ab" * 32


def _body(url: str) -> bytes:
    return json.dumps({"version": "2.0.0", "url": url, "size_bytes": 1024, "sha256": SHA}).encode()


@pytest.mark.parametrize("url", ["https://fw.example/2.0.0.bin", "http://10.0.0.7:8080/fw.bin", "http://[fd00::7]/fw"])
def test_a_download_url_a_device_can_fetch_is_taken(url: str):
    assert parse_firmware(_body(url)).url == url


@pytest.mark.parametrize("url", ["ftp://fw.example/x", "http://;user@host[x/fw", "http://bad_host/fw", "http://fw:99999/x",
                                 "https://"])
def test_a_download_url_no_device_could_fetch_is_refused_naming_it(url: str):
    with pytest.raises(InvalidRequest) as refused:
        parse_firmware(_body(url))
    assert [(e["field"], e["value"]) for e in refused.value.errors] == [("url", url)]
