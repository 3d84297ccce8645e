"""Latency of the dual memory: long-term look-ups with 10,000 stored patterns, and short-term
updates.

Run from the repository root::

    python scripts/bench_memory.py                  # SQLite, plus PostgreSQL if configured
    SEDMA_POSTGRES_URL=postgresql+psycopg://sedma:sedma@127.0.0.1:5432/sedma \\
        python scripts/bench_memory.py
    python scripts/bench_memory.py --quick          # smoke run: 1,000 patterns, few calls

Each look-up or update is timed on its own with ``time.perf_counter_ns`` (its ~0.1 µs
overhead is included); the table gives p50 and p90 and compares p50 with the targets:

- LTM look-up (``best_lambda``), SQLite, LRU off (``lru_size=0``): p50 <= 1 ms;
- LTM look-up, SQLite, LRU on (default ``lru_size=4096``, 1,000 hot keys, warmed, TTL longer
  than the run): p50 <= 20 µs;
- LTM look-up, PostgreSQL (``$SEDMA_POSTGRES_URL``, or ``--postgres-url``), LRU off: measured,
  no target; the run uses a schema of its own in that database and drops it afterwards;
- STM update (``ShortTermMemory.update``): p50 <= 5 µs.

The stores are filled through the public API (``record_lambda``, one transaction each), so the
write latency (p50/p90 of those inserts) is reported too. Writes
``results/bench_memory[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa
from benchmark_utils import cpu_model, git_revision
from tqdm import tqdm

from sedma_torch.memory import LongTermMemory, ShortTermMemory

REPO_ROOT = Path(__file__).resolve().parents[1]
MATERIALS = ("epiram", "ag_asi", "alox_hfo2", "taox_hfox")


@dataclass
class Row:
    """One line of the result table (latencies in µs)."""

    measurement: str
    backend: str
    p50_us: float
    p90_us: float
    calls: int
    target_p50_us: float | None

    @property
    def verdict(self) -> str:
        if self.target_p50_us is None:
            return "measured"
        return "PASS" if self.p50_us <= self.target_p50_us else "FAIL"


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    q = statistics.quantiles(samples_ns, n=10, method="inclusive")
    return statistics.median(samples_ns) / 1e3, q[8] / 1e3


def _timed(fn: Callable[[], object], calls: int) -> list[int]:
    samples = []
    for _ in range(calls):
        begin = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - begin)
    return samples


def _keys(n: int) -> list[tuple[str, str]]:
    return [
        (MATERIALS[i % len(MATERIALS)], f"workload_{i // len(MATERIALS):05d}") for i in range(n)
    ]


def _fill(url: str, keys: list[tuple[str, str]], label: str) -> list[int]:
    """Store one λ per key through the API; return each write's latency (ns)."""
    rng = random.Random(0)
    samples = []
    with LongTermMemory(url, capacity=max(10_000, len(keys))) as ltm:
        for material, workload in tqdm(keys, desc=f"fill {label}", unit="pattern"):
            begin = time.perf_counter_ns()
            ltm.record_lambda(material, workload, rng.uniform(0, 1), rng.uniform(0, 0.1))
            samples.append(time.perf_counter_ns() - begin)
    return samples


def _lookups(
    url: str, keys: list[tuple[str, str]], calls: int, *, lru: bool, seed: int
) -> list[int]:
    rng = random.Random(seed)
    # with the LRU: a TTL longer than the run, so no warmed entry expires while it is timed
    with LongTermMemory(url, lru_size=4096 if lru else 0, lru_ttl_s=600.0) as ltm:
        if lru:
            hot = rng.sample(keys, min(1000, len(keys)))
            for key in hot:  # warm the cache
                assert ltm.best_lambda(*key) is not None
            chosen = [hot[rng.randrange(len(hot))] for _ in range(calls)]
        else:
            chosen = [keys[rng.randrange(len(keys))] for _ in range(calls)]
        it = iter(chosen)
        samples = _timed(lambda: ltm.best_lambda(*next(it)), calls)
        assert all(ltm.best_lambda(*key) is not None for key in chosen[:10])
    return samples


@contextmanager
def _postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose tables live in a new schema of ``base_url``'s database, dropped on exit."""
    url = sa.make_url(base_url).set(drivername="postgresql+psycopg")
    schema = f"sedma_bench_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        engine.dispose()


def run(args: argparse.Namespace) -> list[Row]:
    keys = _keys(args.patterns)
    rows: list[Row] = []

    def add(measurement: str, backend: str, samples: list[int], target: float | None) -> None:
        p50, p90 = _percentiles(samples)
        rows.append(Row(measurement, backend, p50, p90, len(samples), target))

    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = str(Path(tmp) / "bench_memory.db")
        add("LTM write (record_lambda)", "sqlite", _fill(sqlite_url, keys, "sqlite"), None)
        add(
            f"LTM look-up, {args.patterns} patterns, LRU off",
            "sqlite",
            _lookups(sqlite_url, keys, args.lookups, lru=False, seed=1),
            1000.0,
        )
        add(
            f"LTM look-up, {args.patterns} patterns, LRU on (hot)",
            "sqlite",
            _lookups(sqlite_url, keys, args.lookups * 10, lru=True, seed=2),
            20.0,
        )

    if args.postgres_url:
        with _postgres_schema(args.postgres_url) as pg_url:
            add("LTM write (record_lambda)", "postgresql", _fill(pg_url, keys, "postgres"), None)
            add(
                f"LTM look-up, {args.patterns} patterns, LRU off",
                "postgresql",
                _lookups(pg_url, keys, args.lookups, lru=False, seed=1),
                None,
            )
            add(
                f"LTM look-up, {args.patterns} patterns, LRU on (hot)",
                "postgresql",
                _lookups(pg_url, keys, args.lookups * 10, lru=True, seed=2),
                20.0,
            )
    else:
        print("PostgreSQL rows skipped: set SEDMA_POSTGRES_URL (or --postgres-url) to measure them")

    stm = ShortTermMemory(window=100, ewma_alpha=0.1)
    rng = random.Random(3)
    values = [rng.gauss(0.0, 1.0) for _ in range(args.stm_updates)]
    stm_keys = [f"error/{MATERIALS[i % 4]}" for i in range(args.stm_updates)]
    it = iter(zip(stm_keys, values, strict=True))
    add(
        "STM update (window 100 + EWMA)",
        "in-process",
        _timed(lambda: stm.update(*next(it)), args.stm_updates),
        5.0,
    )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| measurement | backend | p50 (µs) | p90 (µs) | calls | target p50 (µs) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r.target_p50_us is None else f"<= {r.target_p50_us:g}"
        lines.append(
            f"| {r.measurement} | {r.backend} | {r.p50_us:.2f} | {r.p90_us:.2f} | {r.calls} "
            f"| {target} | {r.verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", type=int, default=10_000, help="patterns stored")
    parser.add_argument("--lookups", type=int, default=2_000, help="timed look-ups without LRU")
    parser.add_argument("--stm-updates", type=int, default=200_000, help="timed STM updates")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SEDMA_POSTGRES_URL"),
        help="PostgreSQL URL (default: $SEDMA_POSTGRES_URL; unset = skip PostgreSQL)",
    )
    parser.add_argument("--quick", action="store_true", help="1,000 patterns, few calls")
    parser.add_argument("--output", type=Path, default=None, help="JSON result file")
    args = parser.parse_args()
    if args.quick:
        args.patterns, args.lookups, args.stm_updates = 1_000, 200, 20_000
    output = args.output or REPO_ROOT / "results" / (
        "bench_memory_quick.json" if args.quick else "bench_memory.json"
    )

    rows = run(args)
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} CPUs; revision {git_revision()}\n")
    print(table(rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "machine": cpu_model(),
                "revision": git_revision(),
                "patterns": args.patterns,
                "rows": [asdict(r) | {"verdict": r.verdict} for r in rows],
            },
            indent=2,
        )
    )
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
