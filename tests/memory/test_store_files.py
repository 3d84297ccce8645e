"""Opening stores: URLs and defaults, foreign/corrupt/newer stores refused untouched, schema
upgrades in place (SQLite files, and PostgreSQL databases under the ``postgres`` mark)."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from sedma_torch.memory import SCHEMA_VERSION, LongTermMemory, MemoryStoreError

V1_DDL = [
    "CREATE TABLE sedma_meta (name VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)",
    "CREATE TABLE sedma_patterns (kind VARCHAR(64) NOT NULL, key VARCHAR(1025) NOT NULL, "
    "value TEXT NOT NULL, score FLOAT, count INTEGER NOT NULL, created_at FLOAT NOT NULL, "
    "updated_at FLOAT NOT NULL, PRIMARY KEY (kind, key))",
    "CREATE INDEX ix_sedma_patterns_updated ON sedma_patterns (updated_at, count)",
]
"""Schema version 1 written by hand (keyed records only), as an older sedma_torch left it."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_v1(execute) -> None:
    for ddl in V1_DDL:
        execute(ddl, {})
    for name, value in [("application", "sedma_torch.memory"), ("schema_version", "1")]:
        execute("INSERT INTO sedma_meta VALUES (:n, :v)", {"n": name, "v": value})
    execute(
        "INSERT INTO sedma_patterns VALUES (:k, :key, :v, :s, :c, :t0, :t1)",
        {
            "k": "lambda",
            "key": "taox_hfox\x1fdense_256",
            "v": '{"error":0.02,"lam":0.5}',
            "s": 0.02,
            "c": 3,
            "t0": 10.0,
            "t1": 20.0,
        },
    )


def _check_upgraded(url: str) -> None:
    with LongTermMemory(url) as ltm:
        assert ltm.schema_version == SCHEMA_VERSION == 2
        assert ltm.best_lambda("taox_hfox", "dense_256") == (0.5, 0.02)
        entry = ltm.entry("lambda", ("taox_hfox", "dense_256"))
        assert (entry.count, entry.created_at, entry.updated_at) == (3, 10.0, 20.0)
        ltm.record_lambda("taox_hfox", "dense_256", 0.25, 0.01)
        # the old record counts as one observation of 0.5: mean (0.02 + 0.001) / 2 > 0.01
        ltm.record_lambda("taox_hfox", "dense_256", 0.5, 0.001)
        ltm.record_transfer("rank1", True, 2.0, 64)  # a table version 2 added
        assert ltm.peer_profile("rank1")["attempts"] == 1
    with LongTermMemory(url) as ltm:  # opening the upgraded store again changes nothing
        assert ltm.best_lambda("taox_hfox", "dense_256") == (0.25, 0.01)
        entry = ltm.entry("lambda", ("taox_hfox", "dense_256"))
        assert entry.count == 5
        assert entry.value["recent"] == [[0.5, 0.02, 0], [0.25, 0.01, 4], [0.5, 0.001, 5]]


# ----------------------------------------------------------------------------- SQLite files


def test_store_is_created_with_its_folders_in_wal_mode(tmp_path):
    path = tmp_path / "a" / "b" / "memory.db"
    with LongTermMemory(path) as ltm:
        ltm.record_cache_access("c", 1)
        assert ltm.backend == "sqlite" and ltm.path == path.resolve()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(con.execute("SELECT name, value FROM sedma_meta"))
        assert meta["application"] == "sedma_torch.memory" and meta["schema_version"] == "2"
    finally:
        con.close()


def test_default_path_and_environment_variables_choose_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SEDMA_MEMORY_URL", raising=False)
    monkeypatch.delenv("SEDMA_MEMORY_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    with LongTermMemory() as ltm:
        assert ltm.path == tmp_path / "sedma_memory.db"
    assert (tmp_path / "sedma_memory.db").is_file()
    monkeypatch.setenv("SEDMA_MEMORY_PATH", str(tmp_path / "p" / "from_path.db"))
    with LongTermMemory() as ltm:
        assert ltm.path == tmp_path / "p" / "from_path.db"
    monkeypatch.setenv("SEDMA_MEMORY_URL", f"sqlite:///{tmp_path / 'from_url.db'}")
    with LongTermMemory() as ltm:
        assert ltm.path == tmp_path / "from_url.db"
    assert (tmp_path / "p" / "from_path.db").is_file() and (tmp_path / "from_url.db").is_file()


@pytest.mark.parametrize(
    "url,message",
    [
        ("mysql://user@localhost/db", "url scheme 'mysql' is not supported"),
        ("postgresql+asyncpg://u@h/db", "'postgresql\\+asyncpg' is not supported"),
        ("sqlite://", "needs an SQLite file path"),
        ("sqlite:///:memory:", "needs an SQLite file path"),
        ("", "empty string"),
    ],
)
def test_unsupported_urls_are_rejected_with_the_allowed_forms(url, message):
    with pytest.raises(ValueError, match=message):
        LongTermMemory(url)


def test_unreachable_postgresql_raises_a_store_error_without_the_password():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://sedma:hunter2@127.0.0.1:{port}/sedma"
    with pytest.raises(MemoryStoreError, match=rf"127\.0\.0\.1:{port}.*cannot connect") as info:
        LongTermMemory(url, connect_timeout_s=2)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_random_bytes_are_refused_and_left_untouched(tmp_path):
    path = tmp_path / "random.db"
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    before = _sha256(path)
    with pytest.raises(MemoryStoreError, match="is not an SQLite database") as info:
        LongTermMemory(path)
    assert str(path) in str(info.value)
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.db"]


def test_sqlite_database_of_another_application_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "shop.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER)")
    con.executemany("INSERT INTO customers VALUES (?, ?)", [(1, "ada"), (2, "alan")])
    con.commit()
    con.close()
    before = _sha256(path)
    with pytest.raises(MemoryStoreError, match="not a sedma_torch memory store") as info:
        LongTermMemory(path)
    assert str(path) in str(info.value) and "customers" in str(info.value)
    assert _sha256(path) == before
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    con.close()


def test_a_foreign_table_named_sedma_meta_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE sedma_meta (k TEXT, v TEXT)")
    con.commit()
    con.close()
    before = _sha256(path)
    with pytest.raises(MemoryStoreError, match="sedma_meta table cannot be read"):
        LongTermMemory(path)
    assert _sha256(path) == before


def test_damaged_store_is_refused_untouched(tmp_path):
    path = tmp_path / "memory.db"
    with LongTermMemory(path) as ltm:
        for i in range(400):
            ltm.put("k", f"key{i}", {"payload": "x" * 200, "i": i})
    con = sqlite3.connect(path)  # fold the WAL into the main file so the damage hits data
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[2 * page : 6 * page] = np.random.default_rng(1).bytes(4 * page)
    path.write_bytes(bytes(data))
    before = _sha256(path)
    with pytest.raises(MemoryStoreError, match=r"damaged|cannot be read") as info:
        LongTermMemory(path)
    assert str(path) in str(info.value)
    assert _sha256(path) == before


def test_store_of_a_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "memory.db"
    with LongTermMemory(path) as ltm:
        ltm.record_lambda("m", "w", 0.1, 0.2)
    con = sqlite3.connect(path)
    con.execute("UPDATE sedma_meta SET value = '99' WHERE name = 'schema_version'")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = _sha256(path)
    with pytest.raises(MemoryStoreError, match="schema version 99, newer than the version 2"):
        LongTermMemory(path)
    assert _sha256(path) == before


def test_sqlite_store_of_version_1_is_upgraded_in_place_keeping_its_records(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    _write_v1(lambda sql, params: con.execute(sql, params))
    con.commit()
    con.close()
    _check_upgraded(str(path))
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sedma_peers", "sedma_cache_stats", "sedma_transfers", "sedma_deployments"} <= tables
    assert dict(con.execute("SELECT name, value FROM sedma_meta"))["schema_version"] == "2"
    con.close()


# ----------------------------------------------------------------------------- PostgreSQL


def _pg_execute(url: str, statements) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        statements(lambda sql, params: conn.execute(sa.text(sql), params))
    engine.dispose()


def _pg_tables(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = sa.inspect(conn).get_table_names()
        counts = {n: conn.execute(sa.text(f'SELECT count(*) FROM "{n}"')).scalar() for n in names}
    engine.dispose()
    return counts


@pytest.mark.postgres
def test_postgres_store_of_version_1_is_upgraded_in_place_keeping_its_records(postgres_url):
    _pg_execute(postgres_url, _write_v1)
    _check_upgraded(postgres_url)
    assert _pg_tables(postgres_url)["sedma_peers"] == 1


@pytest.mark.postgres
def test_postgres_database_of_another_application_is_refused_untouched(postgres_url):
    def create(execute) -> None:
        execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)", {})
        execute("INSERT INTO customers VALUES (1, 'ada'), (2, 'alan')", {})

    _pg_execute(postgres_url, create)
    with pytest.raises(MemoryStoreError, match=r"not a sedma_torch memory store.*customers"):
        LongTermMemory(postgres_url)
    assert _pg_tables(postgres_url) == {"customers": 2}


@pytest.mark.postgres
def test_postgres_store_of_a_newer_schema_is_refused_untouched(postgres_url):
    with LongTermMemory(postgres_url) as ltm:
        ltm.record_lambda("m", "w", 0.1, 0.2)
    _pg_execute(
        postgres_url,
        lambda ex: ex("UPDATE sedma_meta SET value = '3' WHERE name = 'schema_version'", {}),
    )
    before = _pg_tables(postgres_url)
    with pytest.raises(MemoryStoreError, match="schema version 3, newer"):
        LongTermMemory(postgres_url)
    assert _pg_tables(postgres_url) == before
