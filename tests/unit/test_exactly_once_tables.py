"""Under exactly_once a worker starts from its tables' changelogs, never from RocksDB files a
killed worker may have left holding writes of a transaction the broker then aborted."""
from __future__ import annotations

from pathlib import Path

import faust

from iotflow.worker import discard_local_tables


def _app(tmp_path: Path, guarantee: str) -> faust.App:
    return faust.App(f"t-{guarantee}", datadir=str(tmp_path / guarantee), processing_guarantee=guarantee,
                     autodiscover=False)


def test_exactly_once_discards_the_local_tables(tmp_path: Path):
    app = _app(tmp_path, "exactly_once")
    store = Path(app.conf.tabledir) / "device-accounts-2.db"
    store.mkdir(parents=True)
    (store / "000009.log").write_bytes(b"writes of an aborted transaction")
    assert discard_local_tables(app)
    assert not Path(app.conf.tabledir).exists()
    assert not discard_local_tables(app)  # nothing left to discard


def test_at_least_once_keeps_them(tmp_path: Path):
    app = _app(tmp_path, "at_least_once")
    store = Path(app.conf.tabledir) / "device-accounts-2.db"
    store.mkdir(parents=True)
    assert not discard_local_tables(app)
    assert store.is_dir()
