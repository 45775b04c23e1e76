"""Terminal progress bars and structured logs for thinkforge stages.

- ``progress(iterable_or_total, desc, unit)``: a tqdm bar on a terminal; silent when stderr is not
  a TTY (KFP pods, CI logs) unless ``THINKFORGE_PROGRESS=1`` (``=0`` turns bars off everywhere).
- ``configure_logging(run_id, stage="")``: one line per record,
  ``<time> <LEVEL> run_id=<id> stage=<stage> <logger>: <message>`` (or JSON lines with
  ``THINKFORGE_LOG_FORMAT=json``); every message passes through ``redact()``.
- ``redact(text)``: masks the values of environment variables whose names contain KEY, SECRET,
  TOKEN or PASSWORD, the secrets registered with ``add_secret`` (those read from mounted files, whose
  environment variable holds only the path), and passwords in ``scheme://user:password@host`` URLs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

SECRET_NAME_PARTS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
MASK = "***"
# Values that are never secrets even under a secret-looking name (TOKENIZERS_PARALLELISM=false).
_HARMLESS = {"", "true", "false", "yes", "no", "on", "off", "none", "null", "0", "1"}
_MIN_SECRET_LEN = 6
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)(?P<pw>[^@\s/]+)(?P<post>@)")


# -- progress -------------------------------------------------------------------------------------


# Marks a progress line (THINKFORGE_PROGRESS=lines): `thinkforge run` shows these from its tasks' output.
PROGRESS_MARK = "[progress] "


class _Lines:
    """A file for tqdm that turns each redraw (``\r`` + bar) into one marked line on stderr."""

    def write(self, text: str) -> None:
        for chunk in text.replace("\n", "\r").split("\r"):
            chunk = chunk.strip()
            if chunk:
                sys.stderr.write(PROGRESS_MARK + chunk + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def _lines_mode() -> bool:
    return os.environ.get("THINKFORGE_PROGRESS", "").strip().lower() == "lines"


def progress_enabled(stream: Any = None) -> bool:
    """Bars show on a TTY; THINKFORGE_PROGRESS=1 forces them on, =0 forces them off, =lines writes them
    as marked lines (a parent that reads the output, such as ``thinkforge run``, shows them)."""
    flag = os.environ.get("THINKFORGE_PROGRESS", "").strip().lower()
    if flag in ("1", "true", "yes", "on", "lines"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable_or_total: Iterable[T] | int | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> Any:
    """A tqdm bar over an iterable, or a manual bar for ``total`` units (call ``.update(n)``).

    Use as ``for x in progress(items, "filter", "rollout")`` or
    ``with progress(n_prompts, "generate", "prompt") as bar: bar.update(8)``.
    Extra keyword arguments go to tqdm (``leave``, ``position``, ...).
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    if _lines_mode():
        kwargs.setdefault("file", _Lines())
        kwargs.setdefault("ncols", 80)
        kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        return tqdm(total=iterable_or_total, desc=desc, unit=unit, **kwargs)
    return tqdm(iterable_or_total, desc=desc, unit=unit, **kwargs)


# -- redaction ------------------------------------------------------------------------------------


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of env vars whose names contain KEY/SECRET/TOKEN/PASSWORD, longest first."""
    env = os.environ if environ is None else environ
    vals = set()
    for name, value in env.items():
        upper = name.upper()
        if not any(part in upper for part in SECRET_NAME_PARTS):
            continue
        v = value.strip()
        if len(v) < _MIN_SECRET_LEN or v.lower() in _HARMLESS:
            continue
        vals.add(v)
    return sorted(vals, key=len, reverse=True)


_registered: set[str] = set()


def add_secret(value: str) -> None:
    """Mask ``value`` in every later ``redact`` of this process: a secret read from a file (a mounted
    Kubernetes Secret) is not in the environment, where ``redact`` finds the others."""
    v = (value or "").strip()
    if len(v) >= _MIN_SECRET_LEN and v.lower() not in _HARMLESS:
        _registered.add(v)


def redact(text: Any, extra: Iterable[str] = (), environ: dict[str, str] | None = None) -> str:
    """``text`` with secret env values (and ``extra`` strings) replaced by ``***``.

    Names count as secret when they contain KEY, SECRET, TOKEN or PASSWORD (any case); values
    shorter than 6 characters or boolean-like ones (``TOKENIZERS_PARALLELISM=false``) are left
    alone so ordinary words are not masked. Passwords in ``scheme://user:pw@host`` are masked too.
    """
    s = str(text)
    for v in [*secret_values(environ), *sorted(_registered, key=len, reverse=True), *(e for e in extra if e)]:
        if v in s:
            s = s.replace(v, MASK)
    return _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK + m.group("post"), s)


# -- structured logging ---------------------------------------------------------------------------

_context: dict[str, str] = {"run_id": "-", "stage": "-"}


class _ContextFilter(logging.Filter):
    """Adds run_id/stage to every record and redacts its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "run_id"):
            record.run_id = _context["run_id"]
        if not hasattr(record, "stage"):
            record.stage = _context["stage"]
        return True


class _TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s run_id=%(run_id)s stage=%(stage)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(_TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "run_id": getattr(record, "run_id", "-"),
            "stage": getattr(record, "stage", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, ensure_ascii=False))


_HANDLER_MARK = "_thinkforge_handler"


def configure_logging(run_id: str, stage: str = "", level: int | str | None = None, stream: Any = None) -> logging.Logger:
    """Set up the ``thinkforge`` logger tree once per process (calling again updates the context).

    ``level`` defaults to ``THINKFORGE_LOG_LEVEL`` or INFO; ``THINKFORGE_LOG_FORMAT=json`` writes
    JSON lines. Returns the ``thinkforge`` logger.
    """
    _context["run_id"] = run_id or "-"
    _context["stage"] = stage or "-"
    root = logging.getLogger("thinkforge")
    level = level or os.environ.get("THINKFORGE_LOG_LEVEL", "INFO")
    root.setLevel(level.upper() if isinstance(level, str) else level)
    fmt: logging.Formatter = (
        _JsonFormatter() if os.environ.get("THINKFORGE_LOG_FORMAT", "").lower() == "json" else _TextFormatter()
    )
    handler = next((h for h in root.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if handler is None or (stream is not None and getattr(handler, "stream", None) is not stream):
        if handler is not None:
            root.removeHandler(handler)
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
        setattr(handler, _HANDLER_MARK, True)
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    handler.setFormatter(fmt)
    root.propagate = False
    return root


def set_stage(stage: str) -> None:
    """Change the stage shown in every later log line."""
    _context["stage"] = stage or "-"


@contextlib.contextmanager
def log_context(stage: str) -> Iterator[None]:
    """``with log_context("filter"):`` logs inside carry stage=filter."""
    before = _context["stage"]
    set_stage(stage)
    try:
        yield
    finally:
        _context["stage"] = before


def get_logger(name: str) -> logging.Logger:
    """A logger under ``thinkforge.`` (``get_logger("filter")`` -> ``thinkforge.filter``)."""
    if name != "thinkforge" and not name.startswith("thinkforge."):
        name = "thinkforge." + name
    return logging.getLogger(name)
