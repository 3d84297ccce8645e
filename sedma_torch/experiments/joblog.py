"""The job's log file (Hydra's ``<run dir>/<job>.log``) keeps what the run printed and why
it failed.

Hydra's file handler only receives ``logging`` records, and the apps print their tables, so
without this ``train.log`` / ``eval.log`` stay empty. :func:`job_log` copies everything
written to ``sys.stdout`` into the log (progress bars go to stderr and are not copied) and,
when the job raises, appends the traceback before Hydra reports it; both pass through
:func:`sedma_torch.redact.redact`. A failed run's folder is kept, with its ``.hydra/`` and
the error at the end of its log. Ranks spawned by a data-parallel run find the log in
``$SEDMA_JOB_LOG`` (:func:`tee_from_env`).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..redact import redact

ENV = "SEDMA_JOB_LOG"


class _Tee:
    """A text stream writing to ``stream`` and (redacted) to ``log``."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        try:
            self._log.write(redact(text))
            self._log.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed log never breaks the run
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def hydra_log_path(output_dir: str | Path, job_name: str) -> Path:
    """The file Hydra's job logging writes (its root FileHandler), else
    ``<output_dir>/<job_name>.log``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return Path(output_dir) / f"{job_name}.log"


def _tee(path: Path) -> tuple[IO[str], IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by job_log)
    previous = sys.stdout
    sys.stdout = _Tee(previous, log)  # type: ignore[assignment]
    return previous, log


def tee_from_env() -> None:
    """In a spawned rank: copy stdout into ``$SEDMA_JOB_LOG`` when the launching job set it."""
    path = os.environ.get(ENV)
    if path and not isinstance(sys.stdout, _Tee):
        _tee(Path(path))


@contextmanager
def job_log(path: str | Path) -> Iterator[Path]:
    """Copy stdout into ``path`` while the block runs; on an exception append its
    traceback (redacted) and re-raise."""
    path = Path(path)
    previous, log = _tee(path)
    old_env = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    try:
        yield path
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            text = "".join(traceback.format_exception(exc))
            log.write(redact(f"\nFAILED: {type(exc).__name__}: {exc}\n{text}"))
        raise
    finally:
        sys.stdout.flush()
        sys.stdout = previous
        log.close()
        if old_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old_env


__all__ = ["ENV", "hydra_log_path", "job_log", "tee_from_env"]
