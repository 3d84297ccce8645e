"""``torch.compile`` of converted models: graph breaks, recompilations, correctness, speed.

Run from the repository root::

    python scripts/bench_compile.py                        # MLP + ResNet-18, inductor (minutes)
    python scripts/bench_compile.py --quick                # smoke run: aot_eager, no ResNet timing
    python scripts/bench_compile.py --backend aot_eager    # skip inductor's code generation

Two models, each converted with ``st.convert_`` and compared with its digital twin (the same
initial weights, not converted) compiled the same way:

* ``mlp``: Linear 64->128, ReLU, Linear 128->10, ``torch.compile(fullgraph=True)``;
* ``resnet18``: torchvision ``resnet18(num_classes=10)`` on 3x32x32 inputs,
  ``torch.compile`` with default settings.

Measured for each:

1. **Graph breaks** -- ``torch._dynamo.explain(model)(x)`` (eval, no grad): graph count,
   graph-break count and the break reasons, converted and digital side by side, so breaks
   added by the conversion stand out.
2. **Recompilations** during a realistic sequence at the ideal config
   (``RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)``): eval forwards (no grad)
   at batch sizes 2, 2, 3, 4; ``model.train()`` and 3 SGD steps at batch 2 (forward,
   cross-entropy backward, step); ``model.eval()`` and eval forwards at batch 2, 4, 2.

   How they are counted: ``torch._logging.set_logs(recompiles=True)`` switches on dynamo's
   ``recompiles`` artifact logger (what ``TORCH_LOGS=recompiles`` does), and a
   ``logging.Handler`` on the ``torch._dynamo`` logger -- the parent of that artifact logger
   and of ``torch._dynamo.convert_frame``, which warns when the recompile limit is hit --
   collects every record during the sequence. One "Recompiling function ..." record is
   written per recompilation, whatever triggered it (guard failure on a shape, on grad mode,
   on a module attribute), with its reasons; the benchmark counts those records and keeps
   their reasons. This is the public switch behind ``TORCH_LOGS`` and does not depend on
   dynamo's internal counters; as a cross-check, ``torch._dynamo.utils.counters["stats"]
   ["unique_graphs"]`` (graphs handed to the backend) is reported too. Records and
   ``warnings`` that mention ``recompile_limit`` or ``cache_size_limit`` are counted as
   recompile-limit warnings (must be 0). The captured recompile records are kept off
   stderr (they are in the table and the JSON); other dynamo warnings still print.
3. **Correctness** after that sequence (ideal config, so every path is exact up to
   floating-point reordering): relative errors between the compiled converted model, the
   same model called eagerly and ``st.to_digital(copy.deepcopy(model))``, all in eval mode.
   The optimizer steps change the weights behind the compiled graph, so a compiled
   output equal to the digital one shows that the layers re-program under compile; the
   number of programming events per RRAM layer during the sequence is reported too.
4. **Speed** of an eval forward (no grad) for the noisy config
   ``RRAMConfig(material="taox_hfox", seed=0)``: a freshly compiled model vs the same model
   called eagerly (median of interleaved calls, ``benchmark_utils.time_pair_ms``), the
   digital twin likewise, and the wall time of the first compiled call (tracing plus the
   backend's compilation; inductor's on-disk caches may make a second run faster).

Prints one table and writes ``results/bench_compile[_quick].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from benchmark_utils import cpu_model, git_revision, time_pair_ms
from torch import nn
from torch._dynamo.utils import counters

import sedma_torch as st

REPO_ROOT = Path(__file__).resolve().parents[1]
IDEAL = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
NOISY = st.RRAMConfig(material="taox_hfox", seed=0)
EVAL_BATCHES = (2, 2, 3, 4)
TRAIN_STEPS, TRAIN_BATCH = 3, 2
EVAL_AGAIN_BATCHES = (2, 4, 2)
LIMIT_WORDS = ("recompile_limit", "cache_size_limit")
CPU = torch.device("cpu")


# ----- models ---------------------------------------------------------------------------


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=10)


MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...], bool]] = {
    # key: (label, factory, input shape without the batch, fullgraph)
    "mlp": ("MLP 64-128-10", make_mlp, (64,), True),
    "resnet18": ("ResNet-18 32x32", make_resnet18, (3, 32, 32), False),
}


def pair(factory: Callable[[], nn.Module], config: st.RRAMConfig) -> tuple[nn.Module, nn.Module]:
    """(converted, digital): the same initial weights, one converted to ``config``."""
    base = factory()
    digital = copy.deepcopy(base)
    return st.convert_(base, config, progress=False), digital


def rram_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "program_events")]


def program_events(model: nn.Module) -> int:
    return sum(int(m.program_events) for m in rram_layers(model))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ----- dynamo log capture ---------------------------------------------------------------


class _Records(logging.Handler):
    """Keeps (logger name, level, message) of every record it sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _not_recompiles(record: logging.LogRecord) -> bool:
    return not record.name.endswith("__recompiles")


@contextlib.contextmanager
def dynamo_log_capture() -> Iterator[tuple[_Records, list[warnings.WarningMessage]]]:
    """Collects the records of the ``torch._dynamo`` loggers (with the ``recompiles``
    artifact switched on) and the Python warnings raised inside the block."""
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo")
    existing = list(logger.handlers)
    for handler in existing:  # recompile records go to the table, not to stderr
        handler.addFilter(_not_recompiles)
    capture = _Records()
    logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield capture, caught
    finally:
        logger.removeHandler(capture)
        for handler in existing:
            handler.removeFilter(_not_recompiles)
        torch._logging.set_logs()


def recompile_records(capture: _Records) -> list[str]:
    return [msg for _, _, msg in capture.records if msg.startswith("Recompiling function")]


def limit_warnings(capture: _Records, caught: list[warnings.WarningMessage]) -> list[str]:
    texts = [msg for _, _, msg in capture.records] + [str(w.message) for w in caught]
    return [t for t in texts if any(word in t for word in LIMIT_WORDS)]


def recompile_reasons(messages: list[str]) -> list[str]:
    """``function (file:line): guard failure; ...`` of each "Recompiling function" record."""
    reasons = []
    for message in messages:
        first, *rest = message.splitlines()
        where = first.removeprefix("Recompiling function ").split(" in ", 1)
        name = f"{where[0]} ({Path(where[1]).name})" if len(where) == 2 else first
        failures = [ln.strip()[2:].strip() for ln in rest if ln.strip().startswith("- ")]
        reasons.append(f"{name}: {'; '.join(failures)}")
    return reasons


# ----- measurements ---------------------------------------------------------------------


def explain(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        out = torch._dynamo.explain(model)(x)
    reasons = []
    for reason in out.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame is not None else ""
        reasons.append(f"{reason.reason.strip().splitlines()[0]}{where}")
    torch._dynamo.reset()
    return {
        "graphs": out.graph_count,
        "graph_breaks": out.graph_break_count,
        "break_reasons": reasons,
    }


def warm_eager(model: nn.Module, x: torch.Tensor) -> None:
    """One eager eval call: programs the RRAM layers (and compiles sedma_torch's own
    compiled programming helpers) before the model is compiled, so that the first compiled
    call measures compilation and the counters count the model's graphs only."""
    model.eval()
    with torch.no_grad():
        model(x)


def sequence(
    model: nn.Module, shape: tuple[int, ...], backend: str, fullgraph: bool
) -> tuple[dict[str, object], nn.Module]:
    """The eval / train / eval sequence on ``torch.compile(model)``; returns its record and
    the compiled model (in eval mode)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    warm_eager(model, torch.randn(EVAL_BATCHES[0], *shape, generator=gen))
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    events_before = program_events(model)
    first_call_s = None
    with dynamo_log_capture() as (capture, caught):
        with torch.no_grad():
            for batch in EVAL_BATCHES:
                begin = time.perf_counter()
                compiled(torch.randn(batch, *shape, generator=gen))
                if first_call_s is None:
                    first_call_s = time.perf_counter() - begin
        model.train()
        for _ in range(TRAIN_STEPS):
            x = torch.randn(TRAIN_BATCH, *shape, generator=gen)
            target = torch.randint(0, 10, (TRAIN_BATCH,), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(compiled(x), target).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for batch in EVAL_AGAIN_BATCHES:
                compiled(torch.randn(batch, *shape, generator=gen))
    messages = recompile_records(capture)
    layers = rram_layers(model)
    record = {
        "recompiles": len(messages),
        "recompile_reasons": recompile_reasons(messages),
        "recompile_limit_warnings": len(limit_warnings(capture, caught)),
        "recompile_limit_messages": limit_warnings(capture, caught),
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "first_call_s": first_call_s,
        "program_events_per_layer": (
            (program_events(model) - events_before) / len(layers) if layers else None
        ),
    }
    return record, compiled


def bench_model(key: str, args: argparse.Namespace) -> dict[str, object]:
    label, factory, shape, fullgraph = MODELS[key]
    skip_timing = args.quick and key != "mlp"
    start = time.perf_counter()

    def phase(what: str) -> None:
        print(f"[{label}] {what} ({time.perf_counter() - start:.0f} s)", flush=True)

    phase("explain")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    converted, digital = pair(factory, IDEAL)
    result: dict[str, object] = {"label": label, "fullgraph": fullgraph, "input": [2, *shape]}
    result["explain"] = {"converted": explain(converted, x), "digital": explain(digital, x)}
    phase(f"compile sequence, backend {args.backend}")
    seq_converted, compiled = sequence(converted, shape, args.backend, fullgraph)
    seq_digital, _ = sequence(digital, shape, args.backend, fullgraph)
    result["sequence"] = {"converted": seq_converted, "digital": seq_digital}
    with torch.no_grad():
        y_compiled = compiled(x)
        y_eager = converted(x)
        y_digital = st.to_digital(copy.deepcopy(converted)).eval()(x)
    result["ideal_rel_error"] = {
        "compiled_vs_eager": rel(y_compiled, y_eager),
        "compiled_vs_digital": rel(y_compiled, y_digital),
        "eager_vs_digital": rel(y_eager, y_digital),
    }

    if skip_timing:
        result["wall_s"] = time.perf_counter() - start
        phase("done (--quick: no timing)")
        return result

    phase(f"timing, noisy config, batch {args.batch}")
    torch._dynamo.reset()
    noisy, digital = pair(factory, NOISY)
    xt = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(3))
    timing: dict[str, object] = {"batch": args.batch, "config": NOISY.to_dict()}
    for side, model in (("converted", noisy), ("digital", digital)):
        warm_eager(model, xt)
        compiled = torch.compile(model, backend=args.backend, fullgraph=fullgraph)
        with torch.no_grad():
            begin = time.perf_counter()
            compiled(xt)
            first_call_s = time.perf_counter() - begin
            c_med, e_med, c_min, e_min = time_pair_ms(
                lambda compiled=compiled: compiled(xt),
                lambda model=model: model(xt),
                CPU,
                args.warmup,
                args.repeats,
            )
        timing[side] = {
            "first_call_s": first_call_s,
            "compiled_ms": c_med,
            "eager_ms": e_med,
            "compiled_min_ms": c_min,
            "eager_min_ms": e_min,
        }
    result["timing"] = timing
    torch._dynamo.reset()
    result["wall_s"] = time.perf_counter() - start
    phase("done")
    return result


# ----- reporting ------------------------------------------------------------------------


def fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(quantity, converted, digital, note) lines of one model."""
    c, d = "converted", "digital"
    ex = result["explain"]
    rows = [
        (
            "graphs / graph breaks (explain)",
            f"{ex[c]['graphs']} / {ex[c]['graph_breaks']}",
            f"{ex[d]['graphs']} / {ex[d]['graph_breaks']}",
            "fullgraph=True" if result["fullgraph"] else "default settings",
        )
    ]
    seq, err = result["sequence"], result["ideal_rel_error"]
    rows += [
        (
            "recompiles in the sequence",
            fmt(seq[c]["recompiles"]),
            fmt(seq[d]["recompiles"]),
            "eval b2,2,3,4 / train 3 SGD b2 / eval b2,4,2",
        ),
        (
            "graphs compiled (dynamo counters)",
            fmt(seq[c]["graphs_compiled"]),
            fmt(seq[d]["graphs_compiled"]),
            "1 + recompiles; + sedma's own compiled write-verify step (layers >= 2^20 cells)",
        ),
        (
            "recompile-limit warnings",
            fmt(seq[c]["recompile_limit_warnings"]),
            fmt(seq[d]["recompile_limit_warnings"]),
            "must be 0",
        ),
        (
            "1st compiled call, ideal b2 (s)",
            fmt(seq[c]["first_call_s"]),
            fmt(seq[d]["first_call_s"]),
            "tracing + backend compile",
        ),
        (
            "programming events / layer",
            fmt(seq[c]["program_events_per_layer"]),
            "-",
            f"in the sequence: {TRAIN_STEPS} SGD steps -> {TRAIN_STEPS}",
        ),
        (
            "ideal: compiled vs digital (rel)",
            f"{err['compiled_vs_digital']:.1e}",
            "-",
            f"after training; eager vs digital {err['eager_vs_digital']:.1e}",
        ),
        (
            "ideal: compiled vs eager (rel)",
            f"{err['compiled_vs_eager']:.1e}",
            "-",
            "after training",
        ),
    ]
    if "timing" not in result:
        return [*rows, ("(--quick: no timing)", "", "", "")]
    tm = result["timing"]
    rows += [
        (
            f"1st compiled call, noisy b{tm['batch']} (s)",
            fmt(tm[c]["first_call_s"]),
            fmt(tm[d]["first_call_s"]),
            "fresh compile; digital: not converted",
        ),
        (
            f"eval fwd b{tm['batch']} eager (ms)",
            fmt(tm[c]["eager_ms"]),
            fmt(tm[d]["eager_ms"]),
            "median, interleaved with compiled",
        ),
        (
            f"eval fwd b{tm['batch']} compiled (ms)",
            fmt(tm[c]["compiled_ms"]),
            fmt(tm[d]["compiled_ms"]),
            f"fastest {fmt(tm[c]['compiled_min_ms'])} / {fmt(tm[d]['compiled_min_ms'])}",
        ),
        (
            "speed-up eager / compiled",
            f"{tm[c]['eager_ms'] / tm[c]['compiled_ms']:.2f}x",
            f"{tm[d]['eager_ms'] / tm[d]['compiled_ms']:.2f}x",
            f"of fastest {tm[c]['eager_min_ms'] / tm[c]['compiled_min_ms']:.2f}x / "
            f"{tm[d]['eager_min_ms'] / tm[d]['compiled_min_ms']:.2f}x",
        ),
    ]
    return rows


def print_table(results: dict[str, dict]) -> None:
    header = f"{'model':<16} {'quantity':<34} {'converted':>10} {'digital':>10}  note"
    print(header)
    print("-" * (len(header) + 40))
    for result in results.values():
        for quantity, conv, dig, note in table_rows(result):
            print(f"{result['label']:<16} {quantity:<34} {conv:>10} {dig:>10}  {note}")
    print()
    for result in results.values():
        for side in ("converted", "digital"):
            for reason in result["explain"][side]["break_reasons"]:
                print(f"{result['label']}, {side}: graph break: {reason}")
            seq = result.get("sequence", {}).get(side, {})
            for reason in seq.get("recompile_reasons", []):
                print(f"{result['label']}, {side}: recompile: {reason}")
            for message in seq.get("recompile_limit_messages", []):
                print(f"{result['label']}, {side}: RECOMPILE LIMIT: {message.splitlines()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: aot_eager, few repeats; ResNet-18: no timing",
    )
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default inductor; quick: aot_eager)"
    )
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="timing batch (default 8; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 30)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/)")
    args = parser.parse_args()
    args.backend = args.backend or ("aot_eager" if args.quick else "inductor")
    args.batch = args.batch or (2 if args.quick else 8)
    args.repeats = args.repeats or (5 if args.quick else 30)
    args.warmup = 2 if args.quick else 5
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    print(
        f"torch {torch.__version__}, sedma_torch {st.__version__} ({git_revision()}), "
        f"python {platform.python_version()}"
    )
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), {torch.get_num_threads()} threads")
    print(
        f"backend {args.backend}; timing: median of {args.repeats} interleaved calls after "
        f"{args.warmup} warm-up; recompile_limit {torch._dynamo.config.recompile_limit}"
    )
    print(f"load average before: {load_before[0]:.2f} (1 min)", flush=True)

    begin = time.perf_counter()
    results = {key: bench_model(key, args) for key in args.models}
    wall_s = time.perf_counter() - begin
    load_after = os.getloadavg()
    print()
    print_table(results)
    print(f"total {wall_s:.0f} s; load average after: {load_after[0]:.2f} (1 min)", end="")
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        print("  -- other processes competed for the CPU; timings are noisy", end="")
    print()

    output = args.output or REPO_ROOT / "results" / (
        f"bench_compile{'_quick' if args.quick else ''}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "sedma_torch": st.__version__,
        "git": git_revision(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "backend": args.backend,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "recompile_limit": torch._dynamo.config.recompile_limit,
        "wall_s": wall_s,
        "load_average_before_after": [load_before[0], load_after[0]],
        "ideal_config": IDEAL.to_dict(),
    }
    output.write_text(json.dumps({"meta": meta, "models": results}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
