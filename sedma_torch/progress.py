"""Progress bars that suit where stderr goes.

On a terminal: tqdm bars, nested ones cleared when done (``leave=False``). Redirected to a
file or a pipe (a log, CI, ``2> err.txt``): no bars and no escape codes; a top-level stage
(``leave=True``) writes one line when it ends (``digital epochs: 8/8 in 11.2 s``), nested
ones write nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def stderr_is_tty() -> bool:
    """Whether stderr is an interactive terminal (false for files, pipes, closed streams)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    disable: bool = False,
    leave: bool = True,
    total: int | None = None,
) -> Iterable[T]:
    """``iterable`` with a progress display (see the module docstring)."""
    if disable:
        return iterable
    if stderr_is_tty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=leave, total=total)
    if not leave:
        return iterable
    return _one_line(iterable, desc, total)


def _one_line(iterable: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    start, done = time.perf_counter(), 0
    for item in iterable:
        yield item
        done += 1
    of = f"/{total}" if total is not None else ""
    print(f"{desc}: {done}{of} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def progress_bar(*, total: int, desc: str, disable: bool = False) -> Any:
    """A manually updated bar (``.update(n)``, ``.set_postfix``, ``.close()``): tqdm on a
    terminal, else one line at ``close()``."""
    from tqdm.auto import tqdm

    if disable or stderr_is_tty():
        return tqdm(total=total, desc=desc, disable=disable)
    return _LineBar(total, desc)


class _LineBar:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._start = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            print(
                f"{self.desc}: {self.n}/{self.total} in {time.perf_counter() - self._start:.1f} s",
                file=sys.stderr,
                flush=True,
            )


__all__ = ["progress", "progress_bar", "stderr_is_tty"]
