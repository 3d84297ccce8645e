"""Long-term memory: persistent records that outlive a process (SQLite or PostgreSQL).

Backends
--------
One SQLAlchemy 2 store, chosen by URL; both backends have the same schema:

- **SQLite** (default): an embedded file, created (with its parent folders) on first use and
  switched to WAL mode. ``LongTermMemory()`` takes the URL from ``$SEDMA_MEMORY_URL``, else
  the path from ``$SEDMA_MEMORY_PATH``, else ``./sedma_memory.db``. A plain path or
  ``sqlite:///PATH`` works too. A new store is created atomically (built under a temporary
  name ``.NAME.PID-RANDOM.creating`` beside it and hard-linked into place), so a store file
  is never empty: an existing 0-byte file is not a store and is refused, untouched (delete
  it, or give another path). The file and its folder must be writable (SQLite keeps
  ``NAME-wal`` and ``NAME-shm`` beside it): a read-only file, folder or file system is
  refused when opening, naming the path, with nothing written.
- **PostgreSQL**: ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (extra
  ``sedma-torch[postgres]``; ``postgresql://`` is read as ``postgresql+psycopg://``). Use a
  database (or a schema, ``?options=-csearch_path%3Dmyschema``) of its own: a database that
  holds other tables and no SEDMA tables is refused, never modified.

Records
-------
Keyed records ("patterns", table ``sedma_patterns``; each with ``count`` = records merged,
``created_at`` and ``updated_at`` in unix seconds):

- ``lambda`` (material, workload): the λ that did best *recently*: the last
  ``lambda_window`` (default 8) observations (λ, error) are kept, and the best λ is the one
  with the lowest mean error over its observations among them (see
  :meth:`LongTermMemory.record_lambda`), so a once-lucky record does not win forever;
- ``partition`` (workload): the partition with the lowest cost recorded so far;
- ``deployment`` (pattern): the placement with the highest performance recorded so far;
- any other kind through :meth:`LongTermMemory.put` / :meth:`LongTermMemory.get` (last write
  wins).

Aggregates: peer performance profiles (``sedma_peers``: transfers, successes, summed latency
and bytes, first/last seen) and cache access statistics (``sedma_cache_stats``: accesses,
size, first/last access). Histories (newest first on read): every transfer
(``sedma_transfers``) and every deployment outcome (``sedma_deployments``).

Capacity and eviction
---------------------
Each keyed table (patterns, peers, cache statistics) holds at most ``capacity`` rows
(default 10,000). When an insert of a *new* key makes a table exceed it, the rows that were
**least recently updated** are deleted (smallest ``updated_at`` / ``last_seen`` /
``last_access``; ties: lowest count first, then smallest key), in the same transaction.
Look-ups do not count as updates (that would turn every read into a write): a record that
matters is kept alive by recording it again. Histories keep the newest ``history_capacity``
rows of each table (default 100,000); older rows are deleted on insert.

Look-up cache and visibility
----------------------------
An in-process LRU (``lru_size`` entries, 0 disables it) sits in front of the keyed
look-ups (:meth:`~LongTermMemory.best_lambda`, :meth:`~LongTermMemory.best_partition`,
:meth:`~LongTermMemory.best_deployment`, :meth:`~LongTermMemory.get`,
:meth:`~LongTermMemory.entry`, :meth:`~LongTermMemory.peer_profile`,
:meth:`~LongTermMemory.cache_stats`; histories are always read from the database). A write
through this object drops the entries it affects, so a process never reads its own stale
value. A write by *another* process (or another ``LongTermMemory`` object) becomes visible
here once the cached entry is refreshed: at most ``lru_ttl_s`` seconds later (default 1 s;
``None`` = only when evicted from the LRU), or at once after :meth:`~LongTermMemory.clear_cache`.

Concurrency and crashes
-----------------------
Every record is one transaction with an atomic upsert (``INSERT ... ON CONFLICT DO UPDATE``
with ``count = count + 1`` on both dialects), so several processes writing at once lose no
record. SQLite: WAL mode (readers never block the writer), ``BEGIN IMMEDIATE`` for writes,
a busy timeout (``busy_timeout_s``) and retries with backoff on "database is locked" until
that timeout; ``synchronous=NORMAL`` (a killed process loses nothing committed and leaves
the file readable; a power cut may lose the last transactions, never the file). PostgreSQL:
retries on serialization failures and deadlocks. The schema is created or upgraded under a
lock (SQLite write lock, PostgreSQL advisory lock), so processes may open a fresh store
together. Opening an existing SQLite store reads its layout and runs ``PRAGMA quick_check``
(about 25 ms for 10,000 patterns) before anything is written to it. A ``LongTermMemory`` may be shared by threads; after ``fork()`` the child opens its
own connections.

Schema versions
---------------
Table ``sedma_meta`` holds ``application`` and ``schema_version``. Opening a store of an
older version upgrades it in place (adding what later versions added, keeping every row);
opening a newer one raises :class:`MemoryStoreError` and leaves it untouched. Version 1:
keyed records (``sedma_meta``, ``sedma_patterns``). Version 2: peer profiles, cache
statistics, transfer and deployment histories.

Errors
------
Invalid arguments (NaN or negative λ/error/sizes, empty keys, unknown URL scheme) raise
``ValueError``/``TypeError`` naming the argument and what is allowed. A store that cannot
be used (unreachable server, an empty file or one that is not SQLite, an SQLite database of
another application, a damaged or newer store, a file or folder that is not writable:
permission denied or a read-only file system) raises :class:`MemoryStoreError` naming the
path or URL (password hidden) and what is wrong; such a file is never written to.
"""

from __future__ import annotations

import json
import math
import operator
import os
import random
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ..redact import redact

__all__ = [
    "APPLICATION",
    "BUILTIN_KINDS",
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "LongTermMemory",
    "MemoryEntry",
    "MemoryStoreError",
]

T = TypeVar("T")

APPLICATION = "sedma_torch.memory"
"""Value of ``application`` in ``sedma_meta``: how a SEDMA store recognises itself."""
SCHEMA_VERSION = 2
"""Schema version written by this code (see the module docstring for the history)."""
DEFAULT_PATH = "sedma_memory.db"
"""SQLite file used when neither a URL nor ``$SEDMA_MEMORY_URL``/``$SEDMA_MEMORY_PATH`` is
given (relative to the working directory)."""
MAX_NAME_CHARS = 512
"""Longest key (material, workload, peer, content id, pattern) accepted, in characters."""
BUILTIN_KINDS = frozenset({"lambda", "partition", "deployment"})
"""Pattern kinds written by the dedicated ``record_*`` methods; :meth:`LongTermMemory.put`
refuses them (their merge rules are "best recently" or "keep the best", not "last write
wins")."""
LAMBDA_WINDOW = 8
"""Default ``lambda_window``: observations (λ, error) kept per ``lambda`` record."""
LAMBDA_SAME_RTOL = 1e-9
"""Two recorded λ values within this relative tolerance count as the same λ."""

_SEP = "\x1f"  # joins the parts of a composite key (material, workload)
_SQLITE_HEADER = b"SQLite format 3\x00"
_PG_LOCK_ID = 0x5ED3A_0001  # advisory lock held while creating/upgrading the schema
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


class MemoryStoreError(RuntimeError):
    """The long-term memory store cannot be opened or used (the message says which store
    and what is wrong)."""


@dataclass(frozen=True)
class MemoryEntry:
    """One keyed record of the long-term memory, as returned by :meth:`LongTermMemory.entry`."""

    kind: str
    """``"lambda"``, ``"partition"``, ``"deployment"`` or a kind given to ``put``."""
    key: str | tuple[str, ...]
    """The key as given (``(material, workload)`` for ``lambda``)."""
    value: dict[str, Any]
    """The stored JSON object (``{"lam", "error", "recent"}`` for ``lambda``: the best λ, its
    mean recent error, and the kept observations ``[lam, error, seq]`` oldest first; a
    record written by an older sedma_torch holds ``{"lam", "error"}`` only; the partition;
    ``{"placement", "performance"}`` for ``deployment``)."""
    score: float | None
    """Mean recent error of the best λ (``lambda``), cost (``partition``), performance
    (``deployment``), or the ``score`` given to ``put``."""
    count: int
    """Number of records merged into this entry."""
    created_at: float
    """Unix seconds of the first record."""
    updated_at: float
    """Unix seconds of the latest record (whether or not it replaced the best)."""


# --------------------------------------------------------------------------- schema

_metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: rowid alias

_meta = sa.Table(
    "sedma_meta",
    _metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
_patterns = sa.Table(
    "sedma_patterns",
    _metadata,
    sa.Column("kind", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(MAX_NAME_CHARS * 2 + 1), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("score", sa.Float(precision=53)),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("updated_at", sa.Float(precision=53), nullable=False),
    sa.Index("ix_sedma_patterns_updated", "updated_at", "count"),
)
_peers = sa.Table(
    "sedma_peers",
    _metadata,
    sa.Column("peer", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("transfers", sa.Integer, nullable=False),
    sa.Column("successes", sa.Integer, nullable=False),
    sa.Column("latency_ms_sum", sa.Float(precision=53), nullable=False),
    sa.Column("bytes_sum", sa.BigInteger, nullable=False),
    sa.Column("first_seen", sa.Float(precision=53), nullable=False),
    sa.Column("last_seen", sa.Float(precision=53), nullable=False),
    sa.Index("ix_sedma_peers_last_seen", "last_seen", "transfers"),
)
_cache = sa.Table(
    "sedma_cache_stats",
    _metadata,
    sa.Column("content_id", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("accesses", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("first_access", sa.Float(precision=53), nullable=False),
    sa.Column("last_access", sa.Float(precision=53), nullable=False),
    sa.Index("ix_sedma_cache_last_access", "last_access", "accesses"),
)
_transfers = sa.Table(
    "sedma_transfers",
    _metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("peer", sa.String(MAX_NAME_CHARS), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Index("ix_sedma_transfers_peer", "peer", "id"),
)
_deployments = sa.Table(
    "sedma_deployments",
    _metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("pattern", sa.String(MAX_NAME_CHARS), nullable=False),
    sa.Column("placement", sa.Text, nullable=False),
    sa.Column("performance", sa.Float(precision=53), nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Index("ix_sedma_deployments_pattern", "pattern", "id"),
)

_MIGRATIONS: tuple[tuple[int, tuple[sa.Table, ...]], ...] = (
    (1, (_meta, _patterns)),
    (2, (_peers, _cache, _transfers, _deployments)),
)
"""(version, tables it adds). A fresh store runs every step; an older one the missing ones."""


def _tables_up_to(version: int) -> set[str]:
    return {t.name for v, tables in _MIGRATIONS if v <= version for t in tables}


# --------------------------------------------------------------------------- validation


def _name(arg: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{arg} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{arg} must have at most {MAX_NAME_CHARS} characters, got {len(value)}")
    if _SEP in value:
        raise ValueError(f"{arg} must not contain the control character \\x1f, got {value!r}")
    return value


def _kind(value: object) -> str:
    kind = _name("kind", value)
    if len(kind) > 64:
        raise ValueError(f"kind must have at most 64 characters, got {kind!r}")
    return kind


def _real(arg: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise TypeError(f"{arg} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        raise ValueError(f"{arg} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {x}")
    return x


def _size(arg: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be an integer number of bytes, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{arg} must be an integer number of bytes, got {type(value).__name__} {value!r}"
        ) from None
    if n < 0:
        raise ValueError(f"{arg} must be >= 0, got {n}")
    return n


def _json(arg: str, value: object) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a dict, got {type(value).__name__} {value!r}")
    try:
        return json.dumps(
            value, sort_keys=True, allow_nan=False, separators=(",", ":"), default=_scalar
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{arg} must be JSON-serialisable with finite numbers and string keys: {exc}"
        ) from None


def _scalar(value: object) -> object:
    """JSON fallback: a NumPy scalar or a one-element tensor becomes its Python number."""
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0:
        return item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _pattern_key(kind: str, key: object) -> str:
    if isinstance(key, tuple):
        if not key:
            raise ValueError(f"key for kind {kind!r} must not be an empty tuple")
        return _SEP.join(_name(f"key[{i}]", part) for i, part in enumerate(key))
    return _name("key", key)


def _split_key(key: str) -> str | tuple[str, ...]:
    return tuple(key.split(_SEP)) if _SEP in key else key


def _positive_int(arg: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- LRU

_MISS = object()
_PEER = object()  # LRU namespace of peer profiles
_CACHE = object()  # LRU namespace of cache statistics


class _LRU:
    """Thread-safe LRU with an optional time to live; ``generation`` counts invalidations so a
    reader that raced with a write does not cache what it read before the write."""

    def __init__(self, size: int, ttl_s: float | None) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.generation = 0
        self._data: OrderedDict[object, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> object:
        if not self.size:
            return _MISS
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return _MISS
            if self.ttl_s is not None and time.monotonic() > item[0]:
                del self._data[key]
                return _MISS
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: object, value: object, generation: int) -> None:
        if not self.size:
            return
        expires = time.monotonic() + self.ttl_s if self.ttl_s is not None else math.inf
        with self._lock:
            if generation != self.generation:
                return
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def invalidate(self, *keys: object) -> None:
        with self._lock:
            self.generation += 1
            for key in keys:
                self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._data.clear()


class _Pattern(NamedTuple):
    text: str
    value: dict[str, Any]  # parsed ``text``; never handed out (callers get a fresh parse)
    score: float | None
    records: int
    created_at: float
    updated_at: float


# --------------------------------------------------------------------------- URL


def _resolve_url(url: str | os.PathLike[str] | None) -> tuple[sa.URL, Path | None]:
    """(SQLAlchemy URL, SQLite path or None)."""
    if url is None:
        url = os.environ.get("SEDMA_MEMORY_URL") or os.environ.get("SEDMA_MEMORY_PATH")
        url = url or DEFAULT_PATH
    if isinstance(url, os.PathLike) or (isinstance(url, str) and "://" not in url):
        text = os.fspath(url)
        if not text.strip():
            raise ValueError("url must be a database URL or a file path, got an empty string")
        path = Path(text).expanduser().resolve()
        return sa.URL.create("sqlite+pysqlite", database=str(path)), path
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, a path or None, got {type(url).__name__}")
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a non-numeric port
        raise ValueError(
            f"url {redact(url)!r} is not a valid database URL: {redact(str(exc))}"
        ) from None
    allowed = "a file path, sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        database = parsed.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ValueError(
                f"url {redact(url)!r}: the long-term memory needs an SQLite file path "
                f"(sqlite:///PATH), not an in-memory or URI database"
            )
        path = Path(database).expanduser().resolve()
        return sa.URL.create("sqlite+pysqlite", database=str(path)), path
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg"), None
    raise ValueError(
        f"url scheme {parsed.drivername!r} is not supported by the long-term memory; use {allowed}"
    )


# --------------------------------------------------------------------------- store


class LongTermMemory:
    """Persistent SEDMA memory on SQLite (default) or PostgreSQL; see the module docstring
    for the records, the eviction rule, the look-up cache and the concurrency guarantees.

    Args:
        url: ``None`` (``$SEDMA_MEMORY_URL``, else ``$SEDMA_MEMORY_PATH``, else
            ``./sedma_memory.db``), a file path, ``sqlite:///PATH`` or
            ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``.
        capacity: most rows per keyed table (patterns, peers, cache statistics), ``>= 1``.
        lru_size: entries of the in-process look-up cache, ``>= 0`` (0 disables it).
        lru_ttl_s: seconds a cached look-up is trusted (bounds how late another process's
            write is seen); ``None`` trusts it until evicted or invalidated.
        history_capacity: most rows kept in each history (transfers, deployments), ``>= 1``.
        lambda_window: observations (λ, error) kept per ``lambda`` record, ``>= 1`` (see
            :meth:`record_lambda`).
        busy_timeout_s: how long a write waits for a busy database (SQLite lock, PostgreSQL
            serialization retries) before raising :class:`MemoryStoreError`.
        connect_timeout_s: PostgreSQL connection timeout.
        clock: source of the stored timestamps (unix seconds); ``time.time`` by default.

    Example::

        ltm = LongTermMemory("results/memory.db")
        ltm.record_lambda("taox_hfox", "dense_256", lam=0.3, error=1.2e-3)
        ltm.best_lambda("taox_hfox", "dense_256")   # (0.3, 0.0012)
        ltm.close()
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        capacity: int = 10_000,
        lru_size: int = 4096,
        lru_ttl_s: float | None = 1.0,
        history_capacity: int = 100_000,
        lambda_window: int = LAMBDA_WINDOW,
        busy_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = _positive_int("capacity", capacity, 1)
        self.history_capacity = _positive_int("history_capacity", history_capacity, 1)
        self.lambda_window = _positive_int("lambda_window", lambda_window, 1)
        lru_size = _positive_int("lru_size", lru_size, 0)
        if lru_ttl_s is not None:
            lru_ttl_s = _real("lru_ttl_s", lru_ttl_s, minimum=0.0)
        self.busy_timeout_s = _real("busy_timeout_s", busy_timeout_s, minimum=0.0)
        connect_timeout_s = _real("connect_timeout_s", connect_timeout_s, minimum=1.0)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._lru = _LRU(lru_size, lru_ttl_s)

        sa_url, self.path = _resolve_url(url)
        self.backend = "sqlite" if self.path is not None else "postgresql"
        self.url = sa_url.render_as_string(hide_password=True)
        """The store's URL with the password hidden (used in every error message)."""
        self._where = f"SQLite file {self.path}" if self.path else f"PostgreSQL store {self.url}"
        self._pid = os.getpid()

        if self.path is not None:
            self._check_sqlite_file(self.path)
            self._engine = sa.create_engine(
                sa_url,
                isolation_level="AUTOCOMMIT",
                connect_args={"timeout": self.busy_timeout_s, "check_same_thread": False},
            )
            sa.event.listen(self._engine, "connect", _sqlite_on_connect)
            self._begin_sql = "BEGIN IMMEDIATE"
            self._insert: Callable[[sa.Table], Any] = sqlite_insert
        else:
            try:
                import psycopg  # noqa: F401
            except ImportError as exc:
                raise MemoryStoreError(
                    f"{self._where}: the PostgreSQL driver psycopg 3 is not installed "
                    f"(pip install 'sedma-torch[postgres]')"
                ) from exc
            self._engine = sa.create_engine(
                sa_url,
                isolation_level="AUTOCOMMIT",
                connect_args={"connect_timeout": max(1, round(connect_timeout_s))},
            )
            self._begin_sql = "BEGIN"
            self._insert = pg_insert
        self._closed = False
        self._build_statements()
        try:
            self.schema_version = self._open_schema()
        except BaseException:
            self._engine.dispose()
            raise

    # ------------------------------------------------------------------ opening

    def _check_sqlite_file(self, path: Path) -> None:
        """Refuse, without writing to it, a file that is not a healthy SEDMA store or that
        cannot be written to; create a new store when ``path`` does not exist."""
        if path.is_dir():
            raise MemoryStoreError(f"SQLite file {path}: is a directory, not a database file")
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MemoryStoreError(
                    f"SQLite file {path}: cannot create its folder: {exc}"
                ) from exc
            self._check_writable(path)
            self._create_sqlite_file(path)
        try:
            with path.open("rb") as fh:
                header = fh.read(len(_SQLITE_HEADER))
        except OSError as exc:
            raise MemoryStoreError(f"SQLite file {path}: cannot be read: {exc}") from exc
        if not header:
            raise MemoryStoreError(
                f"SQLite file {path}: is an empty file (0 bytes), not a sedma_torch memory "
                f"store (a store this code creates is never empty); it was left as it is. "
                f"Delete it to create a new store at this path, or give another path"
            )
        if header != _SQLITE_HEADER:
            raise MemoryStoreError(
                f"SQLite file {path}: is not an SQLite database (its first bytes are "
                f"{header[:16]!r}, expected {_SQLITE_HEADER!r}); refusing to use or modify it"
            )
        self._check_writable(path)
        try:
            con = sqlite3.connect(path, timeout=self.busy_timeout_s)
        except sqlite3.Error as exc:
            raise MemoryStoreError(f"SQLite file {path}: cannot be opened: {exc}") from exc
        try:
            names = {
                row[0]
                for row in con.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            }
            if names:
                version = self._check_layout(names, lambda: dict(con.execute(_META_SQL)))
                if version:
                    check = con.execute("PRAGMA quick_check(1)").fetchone()[0]
                    if check != "ok":
                        raise MemoryStoreError(
                            f"SQLite file {path}: is damaged (PRAGMA quick_check: {check}); "
                            f"it was left as it is"
                        )
        except sqlite3.DatabaseError as exc:
            if _is_permission_error(exc):
                raise MemoryStoreError(
                    f"SQLite file {path}: cannot be written to ({exc}): permission denied or "
                    f"a read-only file system; SQLite needs to write the file and to create "
                    f"{path.name}-wal and {path.name}-shm in its folder. It was left as it is"
                ) from exc
            raise MemoryStoreError(
                f"SQLite file {path}: cannot be read as an SQLite database ({exc}); "
                f"it was left as it is"
            ) from exc
        finally:
            con.close()

    @staticmethod
    def _check_writable(path: Path) -> None:
        """Refuse a store that this process cannot write: the file, its ``-wal``/``-shm``
        companions and its folder (where SQLite creates them) must all be writable."""
        folder = path.parent
        targets = [folder] + [p for p in (path, *_companions(path)) if p.exists() or p.is_symlink()]
        for target in targets:
            why = _unwritable(target)
            if why is None:
                continue
            if target == folder:
                raise MemoryStoreError(
                    f"SQLite file {path}: its folder {folder} is not writable ({why}); SQLite "
                    f"needs to create {path.name}-wal and {path.name}-shm there. Make the "
                    f"folder writable or give another path; nothing was written"
                )
            what = "is not writable" if target == path else f"its {target.name} is not writable"
            raise MemoryStoreError(
                f"SQLite file {path}: {what} ({why}); the long-term memory writes to every "
                f"store it opens. Make it writable or give another path; it was left as it is"
            )

    @staticmethod
    def _create_sqlite_file(path: Path) -> None:
        """Create an empty SQLite database in WAL mode at ``path`` (which did not exist).

        It is built under a temporary name in the same folder and hard-linked into place, so
        ``path`` never exists as a 0-byte file (which :meth:`_check_sqlite_file` refuses):
        processes creating the same store at once all open the one that got linked first.
        Where hard links are not supported, the header is written into a file created
        exclusively at ``path`` (a process opening the store in that microsecond sees it
        empty and refuses it; it can simply retry).
        """
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.creating")
        try:
            try:
                con = sqlite3.connect(tmp)
                try:
                    con.execute("PRAGMA journal_mode = WAL")  # writes the first page
                finally:
                    con.close()
            except sqlite3.Error as exc:
                detail = "permission denied or a read-only file system: " * (
                    _is_permission_error(exc)
                )
                raise MemoryStoreError(
                    f"SQLite file {path}: cannot be created ({detail}{exc})"
                ) from exc
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use that one
            except OSError:  # no hard links on this file system
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return
                except OSError as exc:
                    raise MemoryStoreError(f"SQLite file {path}: cannot be created: {exc}") from exc
                with os.fdopen(fd, "wb") as fh:
                    fh.write(tmp.read_bytes())
        finally:
            for p in (tmp, *_companions(tmp)):
                p.unlink(missing_ok=True)

    def _check_layout(self, names: set[str], read_meta: Callable[[], dict[str, str]]) -> int:
        """Schema version of a store holding tables ``names`` (0 = empty); raises
        :class:`MemoryStoreError` for a foreign, damaged or newer store."""
        if not names:
            return 0
        if _meta.name not in names:
            shown = ", ".join(sorted(names)[:10])
            raise MemoryStoreError(
                f"{self._where}: is not a sedma_torch memory store (it holds the tables "
                f"{shown} and no {_meta.name} table); refusing to use or modify it, "
                f"give the long-term memory a path or database of its own"
            )
        try:
            meta = read_meta()
        except (sqlite3.DatabaseError, sa.exc.DBAPIError) as exc:
            raise MemoryStoreError(
                f"{self._where}: its {_meta.name} table cannot be read ({exc}); it is not "
                f"a sedma_torch memory store"
            ) from exc
        if meta.get("application") != APPLICATION:
            raise MemoryStoreError(
                f"{self._where}: its {_meta.name} table names application "
                f"{meta.get('application')!r}, not {APPLICATION!r}; refusing to use it"
            )
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            raise MemoryStoreError(
                f"{self._where}: has an invalid schema_version "
                f"{meta.get('schema_version')!r} in {_meta.name}"
            ) from None
        if version > SCHEMA_VERSION:
            raise MemoryStoreError(
                f"{self._where}: was written with schema version {version}, newer than the "
                f"version {SCHEMA_VERSION} this sedma_torch reads; upgrade sedma_torch "
                f"(the store was left as it is)"
            )
        missing = _tables_up_to(version) - names
        if version < 1 or missing:
            raise MemoryStoreError(
                f"{self._where}: is damaged: schema version {version} but tables "
                f"{sorted(missing) or 'of version 1'} are missing"
            )
        return version

    def _open_schema(self) -> int:
        """Create or upgrade the schema under the backend's lock; return its version."""
        if self.backend == "sqlite":
            self._run("switch to WAL mode", _enable_wal, write=False)

        def create_or_upgrade(conn: Connection) -> int:
            if self.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
            names = set(sa.inspect(conn).get_table_names())
            version = self._check_layout(
                names, lambda: dict(conn.execute(sa.select(_meta.c.name, _meta.c.value)).all())
            )
            if version == SCHEMA_VERSION:
                return version
            for step, tables in _MIGRATIONS:
                if step > version:
                    for table in tables:
                        table.create(conn)
            now = repr(self._clock())
            rows = {"schema_version": str(SCHEMA_VERSION), "upgraded_at": now}
            if version == 0:
                rows |= {"application": APPLICATION, "created_at": now}
            upsert = self._insert(_meta)
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_meta.c.name], set_={"value": upsert.excluded.value}
                ),
                [{"name": k, "value": v} for k, v in rows.items()],
            )
            return SCHEMA_VERSION

        try:
            return self._run("open", create_or_upgrade, write=True)
        except MemoryStoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise MemoryStoreError(f"{self._where}: cannot be opened: {exc}") from exc

    # ------------------------------------------------------------------ statements

    def _build_statements(self) -> None:
        p, peers, cache = _patterns.c, _peers.c, _cache.c

        def keep_best(better: Callable[[Any, Any], Any]) -> Any:
            ins = self._insert(_patterns)
            new = ins.excluded
            wins = better(new.score, p.score)
            return ins.on_conflict_do_update(
                index_elements=[p.kind, p.key],
                set_={
                    "value": sa.case((wins, new.value), else_=p.value),
                    "score": sa.case((wins, new.score), else_=p.score),
                    "count": p.count + 1,
                    "updated_at": new.updated_at,
                },
            ).returning(p.count)

        self._upsert_lowest = keep_best(operator.lt)
        self._upsert_highest = keep_best(operator.gt)
        ins = self._insert(_patterns)
        self._upsert_last = ins.on_conflict_do_update(
            index_elements=[p.kind, p.key],
            set_={
                "value": ins.excluded.value,
                "score": ins.excluded.score,
                "count": p.count + 1,
                "updated_at": ins.excluded.updated_at,
            },
        ).returning(p.count)
        ins = self._insert(_peers)
        self._upsert_peer = ins.on_conflict_do_update(
            index_elements=[peers.peer],
            set_={
                "transfers": peers.transfers + 1,
                "successes": peers.successes + ins.excluded.successes,
                "latency_ms_sum": peers.latency_ms_sum + ins.excluded.latency_ms_sum,
                "bytes_sum": peers.bytes_sum + ins.excluded.bytes_sum,
                "last_seen": ins.excluded.last_seen,
            },
        ).returning(peers.transfers)
        ins = self._insert(_cache)
        self._upsert_cache = ins.on_conflict_do_update(
            index_elements=[cache.content_id],
            set_={
                "accesses": cache.accesses + 1,
                "size_bytes": ins.excluded.size_bytes,
                "last_access": ins.excluded.last_access,
            },
        ).returning(cache.accesses)
        ins = self._insert(_patterns)
        self._insert_new_pattern = ins.on_conflict_do_nothing(
            index_elements=[p.kind, p.key]
        ).returning(p.count)
        self._select_pattern_for_update = (
            sa.select(p.value, p.count)
            .where(p.kind == sa.bindparam("kind"), p.key == sa.bindparam("key"))
            .with_for_update()  # PostgreSQL: row lock; SQLite: BEGIN IMMEDIATE already locks
        )
        self._update_pattern = (
            sa.update(_patterns)
            .where(p.kind == sa.bindparam("b_kind"), p.key == sa.bindparam("b_key"))
            .values(
                value=sa.bindparam("b_value"),
                score=sa.bindparam("b_score"),
                count=p.count + 1,
                updated_at=sa.bindparam("b_updated_at"),
            )
        )
        self._select_pattern = sa.select(
            p.value, p.score, p.count, p.created_at, p.updated_at
        ).where(p.kind == sa.bindparam("kind"), p.key == sa.bindparam("key"))
        self._select_peer = sa.select(_peers).where(peers.peer == sa.bindparam("peer"))
        self._select_cache = sa.select(_cache).where(cache.content_id == sa.bindparam("cid"))

    # ------------------------------------------------------------------ transactions

    def _connect(self) -> Connection:
        if self._closed:
            raise MemoryStoreError(f"{self._where}: this LongTermMemory was closed")
        if os.getpid() != self._pid:  # forked: never share the parent's connections
            self._engine.dispose(close=False)
            self._lru.clear()
            self._pid = os.getpid()
        return self._engine.connect()

    def _retryable(self, exc: sa.exc.DBAPIError) -> bool:
        if self.backend == "sqlite":
            message = str(exc.orig).lower()
            return isinstance(exc, sa.exc.OperationalError) and (
                "locked" in message or "busy" in message
            )
        return getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES

    def _run(self, operation: str, fn: Callable[[Connection], T], *, write: bool) -> T:
        """``fn(conn)`` in one transaction (``write``) or autocommit read, retried while the
        database is busy for up to ``busy_timeout_s``."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.002
        while True:
            try:
                with self._transaction(write) as conn:
                    return fn(conn)
            except sa.exc.DBAPIError as exc:
                busy = self._retryable(exc)
                if busy and time.monotonic() < deadline:
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(2 * delay, 0.1)
                    continue
                detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                if busy:
                    detail += f" (still busy after {self.busy_timeout_s:g} s)"
                raise MemoryStoreError(f"{self._where}: {operation} failed: {detail}") from exc

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        try:
            conn = self._connect()
        except sa.exc.OperationalError as exc:
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            if self.backend == "postgresql":
                raise MemoryStoreError(f"{self._where}: cannot connect: {detail}") from exc
            raise
        begun = False
        try:
            if write:
                conn.exec_driver_sql(self._begin_sql)
                begun = True
            yield conn
            if begun:
                conn.exec_driver_sql("COMMIT")
                begun = False
        except BaseException:
            if begun:
                try:
                    conn.exec_driver_sql("ROLLBACK")
                except sa.exc.DBAPIError:
                    conn.invalidate()
            raise
        finally:
            conn.close()

    def _evict(self, conn: Connection, table: sa.Table, order: list[Any]) -> list[tuple]:
        """Delete the rows over ``capacity`` (first in ``order``); return their keys."""
        rows = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        excess = rows - self.capacity
        if excess <= 0:
            return []
        pk = list(table.primary_key.columns)
        victims = [tuple(r) for r in conn.execute(sa.select(*pk).order_by(*order).limit(excess))]
        conn.execute(
            sa.delete(table).where(*[c == sa.bindparam(f"pk_{c.name}") for c in pk]),
            [{f"pk_{c.name}": v for c, v in zip(pk, victim, strict=True)} for victim in victims],
        )
        return victims

    def _trim_history(self, conn: Connection, table: sa.Table, new_id: int) -> None:
        if new_id > self.history_capacity:
            cutoff = new_id - self.history_capacity
            conn.execute(sa.delete(table).where(table.c.id <= cutoff))

    # ------------------------------------------------------------------ patterns

    def _record_pattern(
        self, operation: str, stmt: Any, kind: str, key: str, text: str, score: float | None
    ) -> None:
        now = float(self._clock())
        params = {
            "kind": kind,
            "key": key,
            "value": text,
            "score": score,
            "count": 1,
            "created_at": now,
            "updated_at": now,
        }
        p = _patterns.c

        def write(conn: Connection) -> list[tuple]:
            count = conn.execute(stmt, params).scalar_one()
            if count != 1:
                return []
            return self._evict(conn, _patterns, [p.updated_at, p.count, p.kind, p.key])

        try:
            victims = self._run(operation, write, write=True)
        finally:
            self._lru.invalidate((kind, key))
        if victims:
            self._lru.invalidate(*victims)

    def _pattern(self, operation: str, kind: str, key: str) -> _Pattern | None:
        cache_key = (kind, key)
        hit = self._lru.get(cache_key)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        generation = self._lru.generation
        row = self._run(
            operation,
            lambda c: c.execute(self._select_pattern, {"kind": kind, "key": key}).first(),
            write=False,
        )
        result = None if row is None else _Pattern(row[0], json.loads(row[0]), *row[1:])
        self._lru.put(cache_key, result, generation)
        return result

    def record_lambda(self, material: str, workload: str, lam: float, error: float) -> None:
        """Record that denoising strength ``lam`` (``>= 0``) gave ``error`` (``>= 0``, e.g. a
        relative L2 error) for ``material`` on ``workload``.

        The entry keeps the last ``lambda_window`` observations ``(lam, error, seq)`` (``seq``
        = the entry's record count at that write) and its best λ by the **recent-mean
        rule**: observations are grouped by λ (equal within a relative
        :data:`LAMBDA_SAME_RTOL`), each λ scores the mean error of its kept observations,
        and the lowest score wins (a tie: the λ observed most recently). A once-lucky low
        error is thus outvoted by later worse observations of the same λ, by a lower mean
        of another λ, and at the latest forgotten ``lambda_window`` records later. A record
        of an older sedma_torch (``{"lam", "error"}`` only) counts as one observation.
        One transaction (row locked for the read-modify-write), so concurrent writers lose
        no observation."""
        key = _SEP.join((_name("material", material), _name("workload", workload)))
        lam = _real("lam", lam, minimum=0.0)
        error = _real("error", error, minimum=0.0)
        window = self.lambda_window
        now = float(self._clock())
        ident = {"kind": "lambda", "key": key}
        p = _patterns.c

        def write(conn: Connection) -> list[tuple]:
            row = conn.execute(self._select_pattern_for_update, ident).first()
            if row is None:
                value, score = _lambda_value([(lam, error, 1)])
                params = {
                    **ident,
                    "value": value,
                    "score": score,
                    "count": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                if conn.execute(self._insert_new_pattern, params).first() is not None:
                    return self._evict(conn, _patterns, [p.updated_at, p.count, p.kind, p.key])
                # another writer created the entry since our read: merge into it
                row = conn.execute(self._select_pattern_for_update, ident).one()
            recent = _lambda_observations(row[0])
            recent.append((lam, error, int(row[1]) + 1))
            value, score = _lambda_value(recent[-window:])
            conn.execute(
                self._update_pattern,
                {
                    "b_kind": "lambda",
                    "b_key": key,
                    "b_value": value,
                    "b_score": score,
                    "b_updated_at": now,
                },
            )
            return []

        try:
            victims = self._run("record_lambda", write, write=True)
        finally:
            self._lru.invalidate(("lambda", key))
        if victims:
            self._lru.invalidate(*victims)

    def best_lambda(self, material: str, workload: str) -> tuple[float, float] | None:
        """``(lam, mean recent error)`` of the λ that did best recently for (material,
        workload) by the rule of :meth:`record_lambda`, or None."""
        key = _SEP.join((_name("material", material), _name("workload", workload)))
        row = self._pattern("best_lambda", "lambda", key)
        return None if row is None else (row.value["lam"], row.value["error"])

    def record_partition(self, workload: str, partition: Mapping[str, Any], cost: float) -> None:
        """Record a partition (a JSON-serialisable dict) of ``workload`` with its ``cost``
        (finite; lower is better, e.g. Eq. 4's objective); the entry keeps the cheapest."""
        key = _name("workload", workload)
        text = _json("partition", partition)
        self._record_pattern(
            "record_partition", self._upsert_lowest, "partition", key, text, _real("cost", cost)
        )

    def best_partition(self, workload: str) -> dict[str, Any] | None:
        """The cheapest partition recorded for ``workload`` (a fresh dict), or None."""
        row = self._pattern("best_partition", "partition", _name("workload", workload))
        return None if row is None else json.loads(row.text)

    def put(
        self, kind: str, key: str, value: Mapping[str, Any], score: float | None = None
    ) -> None:
        """Store ``value`` (a JSON-serialisable dict) under (kind, key), replacing what was
        there (last write wins; ``count`` still counts every put). ``score`` is an optional
        finite number kept with it. ``kind`` must not be one of :data:`BUILTIN_KINDS`."""
        kind = _kind(kind)
        if kind in BUILTIN_KINDS:
            raise ValueError(
                f"kind {kind!r} is written by LongTermMemory.record_{kind}; "
                f"put() takes any other kind"
            )
        key = _pattern_key(kind, key)
        text = _json("value", value)
        score = None if score is None else _real("score", score)
        self._record_pattern("put", self._upsert_last, kind, key, text, score)

    def get(self, kind: str, key: str | tuple[str, ...]) -> dict[str, Any] | None:
        """The value stored under (kind, key) (a fresh dict), or None. Works for every kind:
        ``get("lambda", (material, workload))`` gives ``{"lam", "error", "recent"}``."""
        kind = _kind(kind)
        row = self._pattern("get", kind, _pattern_key(kind, key))
        return None if row is None else json.loads(row.text)

    def entry(self, kind: str, key: str | tuple[str, ...]) -> MemoryEntry | None:
        """The full record under (kind, key): value, score, count and timestamps; or None."""
        kind = _kind(kind)
        row = self._pattern("entry", kind, _pattern_key(kind, key))
        if row is None:
            return None
        return MemoryEntry(
            kind,
            key,
            json.loads(row.text),
            row.score,
            row.records,
            row.created_at,
            row.updated_at,
        )

    def entries(self, kind: str, limit: int = 1000) -> list[MemoryEntry]:
        """Up to ``limit`` records of ``kind``, most recently updated first (not cached)."""
        kind = _kind(kind)
        limit = _positive_int("limit", limit, 1)
        p = _patterns.c
        stmt = (
            sa.select(p.key, p.value, p.score, p.count, p.created_at, p.updated_at)
            .where(p.kind == kind)
            .order_by(p.updated_at.desc(), p.key)
            .limit(limit)
        )
        rows = self._run("entries", lambda c: c.execute(stmt).all(), write=False)
        return [
            MemoryEntry(kind, _split_key(r[0]), json.loads(r[1]), r[2], r[3], r[4], r[5])
            for r in rows
        ]

    def record_count(self) -> int:
        """Keyed records held (every kind: lambda, partition, deploy decisions, ...)."""
        stmt = sa.select(sa.func.count()).select_from(_patterns)
        return int(self._run("record_count", lambda c: c.execute(stmt).scalar_one(), write=False))

    # ------------------------------------------------------------------ deployments

    def record_deployment(
        self, pattern: str, placement: Mapping[str, Any], performance: float
    ) -> None:
        """Append a deployment outcome to the history of ``pattern`` (e.g. a workload or agent
        graph name) and keep the placement with the highest ``performance`` (finite; higher is
        better, e.g. ops/s) as its best."""
        pattern = _name("pattern", pattern)
        text = _json("placement", placement)
        performance = _real("performance", performance)
        best = _json("placement", {"placement": placement, "performance": performance})
        now = float(self._clock())
        row = {
            "kind": "deployment",
            "key": pattern,
            "value": best,
            "score": performance,
            "count": 1,
            "created_at": now,
            "updated_at": now,
        }
        history = {
            "pattern": pattern,
            "placement": text,
            "performance": performance,
            "created_at": now,
        }
        p = _patterns.c

        def write(conn: Connection) -> list[tuple]:
            new_id = conn.execute(
                sa.insert(_deployments).returning(_deployments.c.id), history
            ).scalar_one()
            self._trim_history(conn, _deployments, new_id)
            if conn.execute(self._upsert_highest, row).scalar_one() != 1:
                return []
            return self._evict(conn, _patterns, [p.updated_at, p.count, p.kind, p.key])

        try:
            victims = self._run("record_deployment", write, write=True)
        finally:
            self._lru.invalidate(("deployment", pattern))
        if victims:
            self._lru.invalidate(*victims)

    def best_deployment(self, pattern: str) -> dict[str, Any] | None:
        """``{"placement", "performance"}`` with the highest performance recorded for
        ``pattern``, or None."""
        row = self._pattern("best_deployment", "deployment", _name("pattern", pattern))
        return None if row is None else json.loads(row.text)

    def deployment_history(self, pattern: str, limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` outcomes of ``pattern``, newest first: dicts with ``placement``,
        ``performance`` and ``created_at`` (unix seconds)."""
        pattern = _name("pattern", pattern)
        limit = _positive_int("limit", limit, 1)
        d = _deployments.c
        stmt = (
            sa.select(d.placement, d.performance, d.created_at)
            .where(d.pattern == pattern)
            .order_by(d.id.desc())
            .limit(limit)
        )
        rows = self._run("deployment_history", lambda c: c.execute(stmt).all(), write=False)
        return [
            {"placement": json.loads(r[0]), "performance": r[1], "created_at": r[2]} for r in rows
        ]

    # ------------------------------------------------------------------ peers

    def record_transfer(self, peer: str, ok: bool, latency_ms: float, nbytes: int) -> None:
        """Record one transfer with ``peer``: whether it completed (``ok``), its latency in ms
        (``>= 0``; time to failure for a failed one) and its size in bytes (``>= 0``). Appends
        to the transfer history and updates the peer's profile."""
        peer = _name("peer", peer)
        if not isinstance(ok, bool):
            raise TypeError(f"ok must be a bool, got {type(ok).__name__} {ok!r}")
        latency_ms = _real("latency_ms", latency_ms, minimum=0.0)
        nbytes = _size("nbytes", nbytes)
        now = float(self._clock())
        history = {
            "peer": peer,
            "ok": ok,
            "latency_ms": latency_ms,
            "nbytes": nbytes,
            "created_at": now,
        }
        profile = {
            "peer": peer,
            "transfers": 1,
            "successes": int(ok),
            "latency_ms_sum": latency_ms,
            "bytes_sum": nbytes,
            "first_seen": now,
            "last_seen": now,
        }
        c = _peers.c

        def write(conn: Connection) -> list[tuple]:
            new_id = conn.execute(
                sa.insert(_transfers).returning(_transfers.c.id), history
            ).scalar_one()
            self._trim_history(conn, _transfers, new_id)
            if conn.execute(self._upsert_peer, profile).scalar_one() != 1:
                return []
            return self._evict(conn, _peers, [c.last_seen, c.transfers, c.peer])

        try:
            victims = self._run("record_transfer", write, write=True)
        finally:
            self._lru.invalidate((_PEER, peer))
        if victims:
            self._lru.invalidate(*[(_PEER, v[0]) for v in victims])

    def peer_profile(self, peer: str) -> dict[str, Any] | None:
        """Profile of ``peer`` over every transfer recorded with it, or None: ``peer``,
        ``attempts`` (transfers recorded), ``successes``, ``success_rate`` (successes /
        attempts), ``mean_latency_ms`` (over all attempts), ``bytes`` (total), ``first_seen``,
        ``last_seen`` (unix seconds)."""
        peer = _name("peer", peer)
        cache_key = (_PEER, peer)
        hit = self._lru.get(cache_key)
        if hit is _MISS:
            generation = self._lru.generation
            row = self._run(
                "peer_profile",
                lambda c: c.execute(self._select_peer, {"peer": peer}).first(),
                write=False,
            )
            hit = None if row is None else _profile(row._mapping)
            self._lru.put(cache_key, hit, generation)
        return None if hit is None else dict(hit)  # type: ignore[call-overload]

    def peer_profiles(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Profiles of up to ``limit`` peers, most recently seen first (not cached)."""
        limit = _positive_int("limit", limit, 1)
        stmt = sa.select(_peers).order_by(_peers.c.last_seen.desc(), _peers.c.peer).limit(limit)
        rows = self._run("peer_profiles", lambda c: c.execute(stmt).all(), write=False)
        return [_profile(r._mapping) for r in rows]

    def transfers(self, peer: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` transfers (of ``peer``, or of every peer), newest first: dicts with
        ``peer``, ``ok``, ``latency_ms``, ``nbytes``, ``created_at``."""
        limit = _positive_int("limit", limit, 1)
        t = _transfers.c
        stmt = sa.select(t.peer, t.ok, t.latency_ms, t.nbytes, t.created_at)
        if peer is not None:
            stmt = stmt.where(t.peer == _name("peer", peer))
        stmt = stmt.order_by(t.id.desc()).limit(limit)
        rows = self._run("transfers", lambda c: c.execute(stmt).all(), write=False)
        return [
            {"peer": r[0], "ok": bool(r[1]), "latency_ms": r[2], "nbytes": r[3], "created_at": r[4]}
            for r in rows
        ]

    # ------------------------------------------------------------------ cache statistics

    def record_cache_access(self, content_id: str, size_bytes: int) -> None:
        """Count one access to cached content ``content_id`` of ``size_bytes`` (``>= 0``; the
        latest size is kept)."""
        content_id = _name("content_id", content_id)
        size_bytes = _size("size_bytes", size_bytes)
        now = float(self._clock())
        params = {
            "content_id": content_id,
            "accesses": 1,
            "size_bytes": size_bytes,
            "first_access": now,
            "last_access": now,
        }
        c = _cache.c

        def write(conn: Connection) -> list[tuple]:
            if conn.execute(self._upsert_cache, params).scalar_one() != 1:
                return []
            return self._evict(conn, _cache, [c.last_access, c.accesses, c.content_id])

        try:
            victims = self._run("record_cache_access", write, write=True)
        finally:
            self._lru.invalidate((_CACHE, content_id))
        if victims:
            self._lru.invalidate(*[(_CACHE, v[0]) for v in victims])

    def cache_stats(self, content_id: str) -> dict[str, Any] | None:
        """``{"accesses", "size_bytes", "first_access", "last_access"}`` (unix seconds) of
        ``content_id``, or None."""
        content_id = _name("content_id", content_id)
        cache_key = (_CACHE, content_id)
        hit = self._lru.get(cache_key)
        if hit is _MISS:
            generation = self._lru.generation
            row = self._run(
                "cache_stats",
                lambda c: c.execute(self._select_cache, {"cid": content_id}).first(),
                write=False,
            )
            hit = None
            if row is not None:
                m = row._mapping
                hit = {
                    "accesses": m["accesses"],
                    "size_bytes": m["size_bytes"],
                    "first_access": m["first_access"],
                    "last_access": m["last_access"],
                }
            self._lru.put(cache_key, hit, generation)
        return None if hit is None else dict(hit)  # type: ignore[call-overload]

    # ------------------------------------------------------------------ lifecycle

    def clear_cache(self) -> None:
        """Drop every cached look-up: the next ones read what other processes wrote."""
        self._lru.clear()

    def close(self) -> None:
        """Release the connections; later calls raise :class:`MemoryStoreError`."""
        if not self._closed:
            self._closed = True
            self._lru.clear()
            self._engine.dispose()

    def __enter__(self) -> LongTermMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LongTermMemory({self.url!r}, capacity={self.capacity}, "
            f"schema_version={self.schema_version})"
        )


_META_SQL = f"SELECT name, value FROM {_meta.name}"


def _lambda_observations(text: str) -> list[tuple[float, float, int]]:
    """The observations ``(lam, error, seq)`` of a stored ``lambda`` value, oldest first; a
    value of an older sedma_torch (``{"lam", "error"}``: its lowest error ever) is one
    observation with ``seq`` 0."""
    value = json.loads(text)
    recent = value.get("recent")
    if isinstance(recent, list):
        return [(float(o[0]), float(o[1]), int(o[2])) for o in recent]
    return [(float(value["lam"]), float(value["error"]), 0)]


def _lambda_value(recent: list[tuple[float, float, int]]) -> tuple[str, float]:
    """(JSON value, score) of a ``lambda`` entry holding ``recent`` (oldest first): the λ
    with the lowest mean error over its observations; a tie goes to the λ seen last."""
    groups: list[tuple[float, list[float], int]] = []  # (latest lam, errors, latest seq)
    for lam, err, seq in recent:
        for i, (g_lam, errs, _) in enumerate(groups):
            if math.isclose(lam, g_lam, rel_tol=LAMBDA_SAME_RTOL):
                errs.append(err)
                groups[i] = (lam, errs, seq)
                break
        else:
            groups.append((lam, [err], seq))
    scored = [(math.fsum(errs) / len(errs), -seq, lam) for lam, errs, seq in groups]
    score, _, lam = min(scored)
    value = {"lam": lam, "error": score, "recent": [list(o) for o in recent]}
    return _json("lam", value), score


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    dbapi_connection.execute("PRAGMA synchronous = NORMAL")


def _companions(path: Path) -> tuple[Path, Path]:
    """The write-ahead log and shared-memory index SQLite keeps beside ``path``."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _unwritable(target: Path) -> str | None:
    """Why this process cannot write ``target`` (an existing file, or a folder to create
    files in), or None when it can. Uses the kernel's own check (``access(2)``), which also
    holds for root without ``CAP_DAC_OVERRIDE`` and for read-only mounts."""
    mode = os.W_OK | os.X_OK if target.is_dir() else os.W_OK
    if os.access(target, mode):
        return None
    if not os.path.lexists(target):
        # a -wal/-shm companion that another process's connection removed between our
        # exists() and access(): SQLite recreates it in the folder, which is checked first
        return None
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        pass
    return "permission denied"


_SQLITE_PERMISSION_CODES = frozenset({3, 8, 14})  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN


def _is_permission_error(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error says the file cannot be written or created (its primary
    result code is PERM, READONLY or CANTOPEN), rather than that it is not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _SQLITE_PERMISSION_CODES


def _enable_wal(conn: Connection) -> None:
    mode = conn.exec_driver_sql("PRAGMA journal_mode = WAL").scalar()
    if str(mode).lower() != "wal":
        raise MemoryStoreError(f"cannot switch the SQLite file to WAL mode (got {mode!r})")


def _profile(m: sa.RowMapping) -> dict[str, Any]:
    transfers = m["transfers"]
    return {
        "peer": m["peer"],
        "attempts": transfers,
        "successes": m["successes"],
        "success_rate": m["successes"] / transfers,
        "mean_latency_ms": m["latency_ms_sum"] / transfers,
        "bytes": m["bytes_sum"],
        "first_seen": m["first_seen"],
        "last_seen": m["last_seen"],
    }
