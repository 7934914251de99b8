"""Every table's RocksDB is bounded by the settings (Faust's defaults are 2 GiB of cache per partition)."""
from __future__ import annotations

from iotflow.app import create_app
from iotflow.settings import Settings
from iotflow.tables import rocksdb_ceiling_mib


def test_every_table_partition_database_is_bounded_by_the_settings(tmp_path):
    settings = Settings.from_env({"IOTFLOW_ROCKSDB_BLOCK_CACHE_MIB": "16", "IOTFLOW_ROCKSDB_WRITE_BUFFER_MIB": "2",
                                  "IOTFLOW_DATA_DIR": str(tmp_path), "IOTFLOW_JWT_SECRET": "x" * 40})
    app = create_app(settings)
    assert len(app.tables) == 6
    for table in app.tables.values():
        options = table.data.rocksdb_options
        assert (options.block_cache_size, options.write_buffer_size, options.max_write_buffer_number) == (
            16 * 1024 * 1024, 2 * 1024 * 1024, 2), table.name
    assert rocksdb_ceiling_mib(settings) == 20


def test_the_default_ceiling_is_the_one_docs_operations_states():
    from pathlib import Path

    operations = (Path(__file__).resolve().parents[2] / "docs/operations.md").read_text()
    assert f"{rocksdb_ceiling_mib(Settings.from_env({}))} MiB per table partition" in operations
