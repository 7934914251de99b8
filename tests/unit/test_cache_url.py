from __future__ import annotations

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from iotflow.cache import client_for


def test_a_plain_url_gives_a_plain_client_with_the_timeouts():
    client = client_for("redis://127.0.0.1:16379/3", timeout_s=0.25)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (16379, 3, 0.25, 0.25)


def test_a_sentinel_url_gives_a_client_of_the_named_master_through_every_sentinel():
    client = client_for("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/iotflow/2", timeout_s=0.25)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "iotflow" and pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["socket_timeout"] == 0.25
    assert [(s.connection_pool.connection_kwargs["port"]) for s in pool.sentinel_manager.sentinels] == [26379, 26380]


def test_a_sentinel_url_without_the_master_name_is_refused():
    with pytest.raises(ValueError, match="names the master"):
        client_for("redis+sentinel://127.0.0.1:26379", timeout_s=0.25)
