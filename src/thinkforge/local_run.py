"""Run the DAG on this machine through ``kfp.local`` with a terminal a person can read.

kfp.local prints every task's executor input and output as JSON and streams every line the task writes
(model loading bars, trainer dictionaries, warnings): thousands of lines for one run. Here everything
goes, ANSI colours stripped, to a log file whose path is printed, and the terminal shows one line per
task start and end with its time, the stages' progress lines (``THINKFORGE_PROGRESS=lines``: on a
terminal one line redrawn in place, otherwise at most one line per 30 s), thinkforge warnings and
errors, and, when a task fails, the end of that task's output. ``verbose=True`` shows everything, as
kfp.local does.

kfp.local runs one task at a time in this process tree (its orchestrator walks the DAG in order), so a
streamed line belongs to the task announced last.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from thinkforge.progress import PROGRESS_MARK

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
# a thinkforge log line (progress.configure_logging's text format) at WARNING or above
_PROBLEM = re.compile(r"\s(?:WARNING|ERROR|CRITICAL) run_id=\S+ stage=\S+ thinkforge")
TAIL_LINES = 40
QUIET_PROGRESS_S = 30.0


class Console:
    """A text stream that stands in for stdout and stderr while kfp.local runs (see the module doc)."""

    def __init__(self, log: TextIO, terminal: TextIO, *, verbose: bool = False, names: dict[str, str] | None = None,
                 clock: Any = time.monotonic):
        self.log = log
        self.names = names or {}  # KFP task name -> the display name the pipeline gives it
        self.terminal = terminal
        self.verbose = verbose
        self.clock = clock
        self.tty = _isatty(terminal)
        self._partial = ""
        self._task = ""
        self._started: dict[str, float] = {}
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._status_line = False  # a progress line is drawn in place and not yet ended
        self._last_progress: dict[str, float] = {}
        self._finished_bars: set[str] = set()
        self.failed: list[str] = []

    # -- the stream interface print(), logging and warnings use
    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return False  # tasks and tqdm in this process: no bars drawn into the log

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        self._end_status_line()
        self.flush()

    # -- what a line becomes
    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw).replace("\r", "").rstrip()
        self.log.write(line + "\n")
        if self.verbose:
            self._show(line)
            return
        started, finished = _STARTED.search(line), _FINISHED.search(line)
        if started:
            self._task = started["task"]
            self._started[self._task] = self.clock()
            self._tail.clear()
            self._show(f"{_now()} {self._name(self._task)} ...")
        elif finished:
            task, status = finished["task"], finished["status"]
            took = self.clock() - self._started.get(task, self.clock())
            if status == "SUCCESS":
                self._show(f"{_now()} {self._name(task)} done in {_duration(took)}")
            else:
                self.failed.append(task)
                self._show(f"{_now()} {self._name(task)} {status} after {_duration(took)}; its last lines:")
                for tail in self._tail:
                    self._show(f"    {tail}")
        elif PROGRESS_MARK in line:
            self._progress(line.split(PROGRESS_MARK, 1)[1].strip())
        else:
            stripped = line.strip()
            if stripped:
                self._tail.append(stripped)
            if _PROBLEM.search(line):
                self._show(f"    {stripped}")

    def _progress(self, text: str) -> None:
        if self.tty:
            width = 120
            self.terminal.write("\r\x1b[K    " + text[:width])
            self.terminal.flush()
            self._status_line = True
            return
        # At most one line per QUIET_PROGRESS_S per bar, and its end once (tqdm redraws it on close).
        key = text.split(":", 1)[0]
        now = self.clock()
        if re.search(r":\s+0%", text):
            self._finished_bars.discard(key)  # a new bar of the same name
            self._last_progress[key] = now
            return
        if "100%" in text:
            if key not in self._finished_bars:
                self._finished_bars.add(key)
                self._show(f"    {text}")
        elif now - self._last_progress.get(key, -1e9) >= QUIET_PROGRESS_S:
            self._last_progress[key] = now
            self._show(f"    {text}")

    def _name(self, task: str) -> str:
        return self.names.get(task, task)

    def _show(self, text: str) -> None:
        self._end_status_line()
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _end_status_line(self) -> None:
        if self._status_line:
            self.terminal.write("\n")
            self._status_line = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _now() -> str:
    return time.strftime("%H:%M:%S")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


@contextlib.contextmanager
def quiet_terminal(log_path: Path, *, verbose: bool = False, names: dict[str, str] | None = None) -> Iterator[Console]:
    """Route stdout/stderr (and the tasks', which kfp.local prints) through a :class:`Console`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    saved_out, saved_err = sys.stdout, sys.stderr
    saved_flag = os.environ.get("THINKFORGE_PROGRESS")
    with open(log_path, "w", encoding="utf-8") as log:
        console = Console(log, saved_out, verbose=verbose, names=names)
        os.environ["THINKFORGE_PROGRESS"] = "lines"  # task processes inherit it: bars become lines
        sys.stdout = sys.stderr = console  # type: ignore[assignment]
        try:
            yield console
        finally:
            sys.stdout, sys.stderr = saved_out, saved_err
            console.close()
            if saved_flag is None:
                os.environ.pop("THINKFORGE_PROGRESS", None)
            else:
                os.environ["THINKFORGE_PROGRESS"] = saved_flag


def run_locally(recipe: Any, recipe_path: str | Path, pipeline_root: str | Path | None = None, *,
                verbose: bool = False, out: TextIO | None = None) -> Path | None:
    """Run ``recipe`` end to end with kfp.local's SubprocessRunner; print the report; return its path.
    A failed task raises kfp's RuntimeError after its last lines were shown."""
    from kfp import local

    from thinkforge.config import flatten
    from thinkforge.pipelines.training import build_pipeline
    from thinkforge.sources import load_problems

    out = out or sys.stdout
    # Fail in a second, with file and line, rather than inside the generate task's traceback.
    load_problems(recipe.data.train, limit=recipe.data.train_limit, storage=recipe.storage)
    root = Path(pipeline_root or Path(recipe.run.output_dir) / recipe.run.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(recipe)
    start = time.time()
    print(f"thinkforge: running recipe {recipe_path} (config {recipe.digest()}) under {root}", file=out)
    print(f"  every task's output: {log_path}", file=out, flush=True)
    try:
        names = {k: t.task_info.name for k, t in pipeline.pipeline_spec.root.dag.tasks.items()}
        with quiet_terminal(log_path, verbose=verbose, names=names):
            task = pipeline(**flatten(recipe))
    except RuntimeError:
        print(f"  every task's output: {log_path}", file=out, flush=True)
        raise
    report = Path(task.output.path) if hasattr(task, "output") else None
    elapsed = time.time() - start
    print("\n" + "=" * 80, file=out)
    if report and report.exists():
        print(report.read_text(), file=out)
    print(f"Finished in {elapsed / 60:.1f} min. Artifacts under {root}", file=out)
    print(f"  log: {log_path}", file=out)
    if report:
        print(f"  report (Markdown): {report}", file=out)
        html = next(report.parent.parent.glob("report_html*"), None)
        if html:
            print(f"  report (HTML):     {html}", file=out)
    return report
