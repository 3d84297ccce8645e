"""Fixtures of the memory tests: a fresh PostgreSQL database per test, and a store URL
parametrised over both backends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "SEDMA_POSTGRES_URL"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database on the server of ``$SEDMA_POSTGRES_URL``
    (its role needs CREATEDB), dropped after the test; skips when the variable is unset."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run sets it after starting PostgreSQL)")
    url = sa.make_url(base).set(drivername="postgresql+psycopg")
    name = f"sedma_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            # commits need not wait for the WAL flush in a throw-away test database
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"{POSTGRES_ENV} is set but the server cannot be used: {exc.orig}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request, tmp_path: Path) -> str:
    """A URL of an empty store: an SQLite file in ``tmp_path``, or a fresh PostgreSQL
    database (``postgres`` mark)."""
    if request.param == "sqlite":
        return str(tmp_path / "memory.db")
    return request.getfixturevalue("postgres_url")
