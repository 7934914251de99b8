"""Faust table definitions and their small helpers."""
from __future__ import annotations

import faust

from iotflow.settings import Settings


_MIB = 1024 * 1024


def rocksdb_options(settings: Settings) -> dict[str, int]:
    """Memory bounds of one table partition's RocksDB (Faust opens one database per table and
    partition, each with its own block cache and write buffers). Faust's defaults are 2 GiB of
    block cache and 3 × 64 MiB of write buffers *per database* — unbounded in practice."""
    return {
        "block_cache_size": settings.rocksdb_block_cache_mib * _MIB,
        "write_buffer_size": settings.rocksdb_write_buffer_mib * _MIB,
        "max_write_buffer_number": 2,
    }


def rocksdb_ceiling_mib(settings: Settings) -> int:
    """The most one table partition's RocksDB may hold in memory (block cache + write buffers)."""
    options = rocksdb_options(settings)
    return (options["block_cache_size"] + options["write_buffer_size"] * options["max_write_buffer_number"]) // _MIB


def bytes_table(app: faust.App, settings: Settings, name: str, help: str) -> faust.Table:
    """A table with bytes keys and values (stored raw), partitioned like iotflow's topics.

    Keys are device-keyed like ``sensor-data`` (or start with the device id), so a table's
    partition is the partition of the messages of the devices it holds.
    """
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions, help=help,
                     options=rocksdb_options(settings))
