"""Command line of sedma_torch: the ``sedma`` console script and ``python -m sedma_torch``.

    sedma train [HYDRA OVERRIDES]      # = python train.py ...   (digits, small CNN, HWA)
    sedma eval [HYDRA OVERRIDES]       # = python eval.py ...    (digital vs RRAM settings)
    sedma reproduce [--list]           # the default experiments: train, then eval of its model
    sedma bench NAME [ARGS]            # = python scripts/bench_NAME.py ARGS

``sedma train`` / ``sedma eval`` run the same Hydra apps as the repository's ``train.py`` /
``eval.py`` (:mod:`.train`, :mod:`.eval`; the job body is :func:`run_job`), composed from
:func:`config_dir`. Results go to ``outputs/<date>/<time>/`` (``-m``: ``multirun/<date>/
<time>/<job number>/`` and ``summary.md``) under the working directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The ``sedma_torch`` package folder."""
REPO_ROOT = PACKAGE_ROOT.parent
"""The checkout the package was installed from (editable install: holds configs/, scripts/)."""


def config_dir() -> Path:
    """The Hydra config folder: ``$SEDMA_CONFIG_DIR``, else the checkout's ``configs/``."""
    env = os.environ.get("SEDMA_CONFIG_DIR")
    candidates = [Path(env).expanduser()] if env else [REPO_ROOT / "configs"]
    for folder in candidates:
        if (folder / "config.yaml").is_file():
            return folder.resolve()
    raise FileNotFoundError(
        f"sedma: no Hydra configs at {candidates[0]} (config.yaml missing); install "
        "sedma_torch from its checkout (pip install -e .) or set SEDMA_CONFIG_DIR to a "
        "copy of the repository's configs/ folder"
    )


def scripts_dir() -> Path:
    """The checkout's ``scripts/`` (benchmarks)."""
    return REPO_ROOT / "scripts"


def run_job(kind: str, cfg: Any) -> None:
    """What ``train.py`` / ``eval.py`` run inside Hydra: redact, check, run; the printed
    table and any error go to the job's log file too (:mod:`..joblog`)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ...redact import redact_run
    from ..config_check import ConfigError, check_app_config
    from ..joblog import hydra_log_path, job_log

    hydra_cfg = HydraConfig.get()
    out = hydra_cfg.runtime.output_dir
    redact_run(out)  # no password in argv, .hydra/*.yaml, logs
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        check_app_config(plain, hydra_cfg.runtime.choices, config_dir())  # unknown keys, types
    except ConfigError as exc:
        # nothing ran: no traceback, and a single run removes the folder this try created
        chosen = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
        removed = not chosen and _discard_untouched_run_dir(out, str(hydra_cfg.mode))
        where = "" if removed else f" (details kept in {out})"
        print(f"{hydra_cfg.job.name}: invalid config: {exc}{where}", file=sys.stderr)
        raise SystemExit(2) from None
    from ...memory.long_term import MemoryStoreError

    log_path = hydra_log_path(out, hydra_cfg.job.name)
    try:
        with job_log(log_path):
            label = hydra_cfg.runtime.choices.get("rram", "rram")
            if kind == "eval":
                from .. import run_eval

                run_eval(plain, out, rram_label=label)
            elif (plain.get("distributed") or {}).get("mode") == "p2p":
                from ..p2p_train import run_train_p2p

                run_train_p2p(plain, out, rram_label=label)
            elif (plain.get("distributed") or {}).get("enabled"):
                from ..distributed_train import run_train_distributed

                run_train_distributed(plain, out, rram_label=label)
            else:
                from .. import run_train

                run_train(plain, out, rram_label=label)
    except (ValueError, FileNotFoundError, MemoryStoreError) as exc:
        # an input the user can fix (value, missing file, store): its message, not a
        # traceback (that is in the log; HYDRA_FULL_ERROR=1 shows it here too)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(
            f"{hydra_cfg.job.name}: {type(exc).__name__}: {exc}\n(traceback in {log_path})",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def _discard_untouched_run_dir(out: str | Path, mode: str) -> bool:
    """Remove a single run's output folder when it holds only what Hydra wrote before the
    job started (``.hydra/`` and the job's ``.log``); keep anything else (a sweep's job
    folder, a folder that already had results; the caller keeps one named by
    ``hydra.run.dir``)."""
    import shutil

    folder = Path(out)
    if not mode.endswith("RUN") or mode.endswith("MULTIRUN") or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    if any(not (e.name == ".hydra" or (e.suffix == ".log" and e.is_file())) for e in entries):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in list(folder.resolve().parents)[:2]:  # outputs/<date>/, outputs/ if empty
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()  # only succeeds on an empty folder
        except OSError:
            break
    return not folder.exists()


# --------------------------------------------------------------------------- sedma

REPRODUCE = [
    (
        "train",
        ["train"],
        "digits + small CNN: digital, then hardware-aware on the open-loop "
        "TaOx-HfOx chip, compared with every material and correction mode",
    ),
    (
        "eval",
        ["eval", "model.weights={run}/model_digital.pt"],
        "the trained digital model evaluated digitally and on the rram setting (eval.py on digits)",
    ),
]

DESCRIPTION = """\
sedma_torch: simulated RRAM in-memory compute for PyTorch (SEDMA).

jobs:
  train      train digitally, then hardware-aware on an RRAM chip, and compare digital with
             every material and correction mode (python train.py; Hydra overrides follow,
             e.g. sedma train rram=ag_asi train.hwa_epochs=3 logger=none)
  eval       evaluate a model digitally and on RRAM settings (python eval.py; e.g.
             sedma eval dataset=imagenet dataset.root=/data/imagenet model=efficientnet_lite0)
  reproduce  the default experiments: train, then eval of the trained model (--list: show
             the commands only)
  bench      run a benchmark, scripts/bench_NAME.py (sedma bench --list names them)

results: train / eval write results.json, results.png, the models and a log to
outputs/<date>/<time>/ under the working directory (hydra.run.dir=DIR to choose; -m sweeps:
multirun/<date>/<time>/<job number>/ and a combined summary.md). The long-term memory is
$XDG_DATA_HOME/sedma_torch/sedma_memory.db (~/.local/share/sedma_torch/) unless
memory.url, $SEDMA_MEMORY_URL or $SEDMA_MEMORY_PATH say otherwise; memory=none runs without.
`sedma train --help` lists the config groups and their options.
"""


def _benches() -> list[str]:
    folder = scripts_dir()
    return sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))


def _hydra_app(kind: str, overrides: Sequence[str]) -> int:
    import importlib

    module = importlib.import_module(f"{__name__}.{kind}")
    saved = sys.argv
    sys.argv = [f"sedma {kind}", *overrides]
    try:
        module.main()
    except SystemExit as exc:  # Hydra exits 1 on a failed job, 0 after --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from datetime import datetime

    base = Path(args.out or f"outputs/reproduce/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    steps = []
    for name, cmd, what in REPRODUCE:
        run = base / name
        argv = [a.format(run=base / "train") for a in cmd[1:]]
        steps.append((name, [cmd[0], *argv, *args.overrides, f"hydra.run.dir={run}"], what))
    if args.list:
        print(f"sedma reproduce would run ({len(steps)} jobs; results under {base}/):")
    for i, (name, argv, what) in enumerate(steps, 1):
        print(f"{i}. {name}: {what}\n   sedma {' '.join(argv)}", flush=True)
        if args.list:
            continue
        code = _hydra_app(argv[0], argv[1:])
        if code:
            print(f"sedma reproduce: {name} failed (exit code {code}); stopping", file=sys.stderr)
            return code
    if not args.list:
        print(f"sedma reproduce: done; results under {base}/ (train/, eval/)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    names = _benches()
    if args.list or not args.name:
        print("benchmarks (sedma bench NAME, scripts/bench_NAME.py):\n  " + "\n  ".join(names))
        return 0 if args.list else 2
    script = scripts_dir() / f"bench_{args.name}.py"
    if not script.is_file():
        print(
            f"sedma bench: no benchmark {args.name!r} ({script} does not exist); known: "
            f"{', '.join(names) or 'none (scripts/ not found: install from the checkout)'}",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sedma", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="job", metavar="{train,eval,reproduce,bench}")
    for kind in ("train", "eval"):
        p = sub.add_parser(
            kind, help=f"python {kind}.py with these Hydra overrides", add_help=False
        )
        p.add_argument("overrides", nargs=argparse.REMAINDER)
    rep = sub.add_parser("reproduce", help="the default experiments: train, then eval")
    rep.add_argument("--list", action="store_true", help="print the commands, run nothing")
    rep.add_argument(
        "--out", help="folder for the jobs' results (default outputs/reproduce/<time>)"
    )
    rep.add_argument("overrides", nargs="*", help="Hydra overrides added to every job")
    bench = sub.add_parser("bench", help="run scripts/bench_NAME.py")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    bench.add_argument("name", nargs="?", help="benchmark name, e.g. placement")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sedma`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):  # everything after the job is Hydra's
        return _hydra_app(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job is None:
        parser.print_help()
        return 2
    if args.job == "reproduce":
        return _reproduce(args)
    return _bench(args)


__all__ = ["build_parser", "config_dir", "main", "run_job"]
