from __future__ import annotations

from pathlib import Path

import pytest

from iotflow.errors import MigrationError
from iotflow.migrate import default_dir, discover


def test_the_shipped_migrations_each_have_an_up_and_a_down_step():
    migrations = discover(default_dir())
    assert migrations, "schema/ holds no migration"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert all(m.up.exists() and m.down.exists() for m in migrations)


def test_a_migration_without_its_down_step_is_refused(tmp_path: Path):
    (tmp_path / "0001_things.up.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="0001_things has no down step"):
        discover(tmp_path)


def test_a_misnamed_file_is_refused(tmp_path: Path):
    (tmp_path / "create_things.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="expected a name like"):
        discover(tmp_path)


def test_two_migrations_with_one_version_are_refused(tmp_path: Path):
    for name in ("0001_a.up.sql", "0001_a.down.sql", "0001_b.up.sql", "0001_b.down.sql"):
        (tmp_path / name).write_text("SELECT 1")
    with pytest.raises(MigrationError, match="share version 0001"):
        discover(tmp_path)
