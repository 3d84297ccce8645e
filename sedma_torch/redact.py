"""Keep secrets out of what a run writes and prints.

A database password given in ``memory.url`` (``postgresql+psycopg://user:secret@host/db``)
or as a libpq keyword (``password=secret``) would otherwise land in ``results.json``'s
command line, in wandb's config and metadata, in Hydra's ``.hydra/*.yaml`` copies of the
config and in error messages. Every one of those goes through :func:`redact` here; the
password is replaced by ``***``, everything else is kept.

Better than redaction is never putting the password on the command line: leave it out of
the URL (``postgresql+psycopg://user@host/db``) and let libpq find it in ``$PGPASSWORD``
or in ``~/.pgpass`` (a libpq password file, mode 0600), or a service entry in
``~/.pg_service.conf``; or give the whole URL by environment variable, ``memory.url=null``
with ``SEDMA_MEMORY_URL=...`` (read by :class:`sedma_torch.memory.LongTermMemory`), or
``memory.url='${oc.env:SEDMA_MEMORY_URL}'`` in a config file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"

# scheme://user:password@host -- the password is everything between the first ':' after
# the user name and the last '@' before the host (a password may contain '@' or ':')
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^\s'\"]*)(?=@)"
)
# libpq keyword/value strings and query parameters: password=secret, passwd=secret
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>\b(?:sslpassword|password|passwd|pwd)\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s&;'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every password in a URL or ``password=`` keyword replaced by ``***``."""
    if not isinstance(text, str):
        raise TypeError(f"redact: expected a string, got {type(text).__name__}")
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def redact_config(obj: Any) -> Any:
    """A copy of a (nested) config with :func:`redact` applied to every string value."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {k: redact_config(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_config(v) for v in obj)
    return obj


def redact_argv() -> None:
    """Redact ``sys.argv`` in place (after Hydra has parsed it): the command line that
    ``results.json`` records and wandb copies into its run metadata."""
    sys.argv[:] = [redact(a) for a in sys.argv]


def redact_hydra_outputs(run_dir: str | Path) -> None:
    """Redact the config copies Hydra wrote into ``<run_dir>/.hydra`` (config.yaml,
    overrides.yaml, hydra.yaml), rewriting a file only when it held a secret."""
    folder = Path(run_dir) / ".hydra"
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text()
        clean = redact(text)
        if clean != text:
            tmp = path.with_name(f".{path.name}.redacted")
            tmp.write_text(clean)
            tmp.replace(path)


def redact_run(run_dir: str | Path) -> None:
    """What a Hydra app calls first: :func:`redact_argv` and :func:`redact_hydra_outputs`."""
    redact_argv()
    redact_hydra_outputs(run_dir)


__all__ = ["MASK", "redact", "redact_argv", "redact_config", "redact_hydra_outputs", "redact_run"]
