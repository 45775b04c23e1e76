"""`thinkforge run`'s terminal: kfp.local's output as it really prints it (lines copied from a smoke
run's stream, colours included) goes to the log file; the terminal keeps task starts and ends, progress,
thinkforge warnings, and a failed task's last lines. The end-to-end check of a real run is in
tests/test_pipeline.py (test_smoke_dag_runs_locally_end_to_end)."""

from __future__ import annotations

import io
import os
import re
import sys

from thinkforge.local_run import Console, quiet_terminal
from thinkforge.progress import PROGRESS_MARK, progress

C, G, R, X = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"
EXECUTOR_DUMP = [  # as kfp.local prints it
    "    [KFP Executor 2026-12-01 15:07:52,100 INFO]: Got executor_input:",
    '        "inputs": {',
    '            "artifacts": {',
    '                            "uri": "/tmp/smoke-run/thinkforge-2026/generate/rollouts",',
    "        }",
    "    }",
]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def __init__(self, tty=False):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def console(tty=False):
    log, term, clock = io.StringIO(), Terminal(tty), Clock()
    return Console(log, term, names={"generate": "1 generate", "filter-rollouts": "2 filter"}, clock=clock), \
        log, term, clock


def feed(c, lines):
    c.write("".join(line + "\n" for line in lines))


def test_the_terminal_shows_tasks_and_the_log_keeps_everything():
    c, log, term, clock = console()
    feed(c, [f"15:07:51.846 - INFO - Executing task {C}'generate'{X}", *EXECUTOR_DUMP,
             "    Loading weights: 100%|##########| 20/20 [00:00<00:00, 5375.93it/s]",
             "    {'loss': '5.679', 'grad_norm': '1.526'}",
             "    2026-12-01T15:07:53.000Z WARNING run_id=smoke stage=generate thinkforge.generate: 2 samples timed out"])
    clock.t = 21.7
    feed(c, [f"15:08:01.793 - INFO - Task {C}'generate'{X} finished with status {G}SUCCESS{X}",
             "    rollouts: Dataset( name='rollouts',"])
    c.close()
    shown = term.getvalue()
    assert "1 generate ..." in shown and "1 generate done in 21.7s" in shown
    assert "2 samples timed out" in shown  # a thinkforge warning reaches the user
    for noise in ("executor_input", '"inputs"', "Loading weights", "grad_norm", "Dataset("):
        assert noise not in shown, noise
    assert len(shown.splitlines()) == 3
    kept = log.getvalue()
    assert "Got executor_input:" in kept and "'loss': '5.679'" in kept and "Dataset( name='rollouts'" in kept
    assert "\x1b[" not in kept  # colours stripped from the log
    assert "Executing task 'generate'" in kept


def test_a_failed_task_shows_its_last_lines():
    c, _, term, clock = console()
    feed(c, [f"INFO - Executing task {C}'filter-rollouts'{X}", *EXECUTOR_DUMP,
             *[f"    line {i}" for i in range(60)],
             "    thinkforge.records.EmptyDataError: filter kept 0 of 8 rollouts; counts per reason: wrong_answer 8"])
    clock.t = 3.0
    feed(c, [f"ERROR - Task {C}'filter-rollouts'{X} finished with status {R}FAILURE{X}"])
    shown = term.getvalue()
    assert "2 filter FAILURE after 3.0s; its last lines:" in shown
    assert "filter kept 0 of 8 rollouts; counts per reason" in shown
    assert "line 59" in shown and "line 10" not in shown  # the last TAIL_LINES lines only
    assert c.failed == ["filter-rollouts"]


def test_progress_lines_are_throttled_off_a_terminal():
    c, _, term, clock = console()
    bar = PROGRESS_MARK + "generate: {p:>3}%|#   | {n}/16 [00:0{n}<00:10, 1.1prompt/s]"
    feed(c, ["    " + bar.format(p=0, n=0)])
    for n in range(1, 16):
        clock.t = 10.0 * n
        feed(c, ["    " + bar.format(p=n * 6, n=n)])
    feed(c, ["    " + bar.format(p=100, n=16)] * 2)  # tqdm redraws the finished bar on close
    lines = [line for line in term.getvalue().splitlines() if "generate:" in line]
    # 150 s of updates every 10 s: one line per 30 s, the 0% start hidden, the end once
    assert len(lines) == 6 and "3/16" in lines[0] and "100%" in lines[-1]


def test_progress_is_redrawn_in_place_on_a_terminal():
    c, _, term, _ = console(tty=True)
    feed(c, [PROGRESS_MARK + "evaluate base: 50%|##  | 4/8", PROGRESS_MARK + "evaluate base: 100%|####| 8/8"])
    feed(c, [f"Task {C}'generate'{X} finished with status {G}SUCCESS{X}"])
    out = term.getvalue()
    drawn = "\r\x1b[K    evaluate base: 50%|##  | 4/8\r\x1b[K    evaluate base: 100%|####| 8/8\n"
    assert out.startswith(drawn)  # one line redrawn, ended before the next message
    assert re.fullmatch(r"\d\d:\d\d:\d\d 1 generate done in 0.0s\n", out[len(drawn):])


def test_verbose_shows_everything():
    log, term = io.StringIO(), Terminal()
    c = Console(log, term, verbose=True)
    feed(c, EXECUTOR_DUMP)
    assert "Got executor_input" in term.getvalue()


def test_tasks_write_progress_as_marked_lines(tmp_path, monkeypatch):
    """Inside `quiet_terminal`, stages' bars (thinkforge.progress) become marked lines that child
    processes inherit through THINKFORGE_PROGRESS=lines; the setting is restored afterwards."""
    monkeypatch.delenv("THINKFORGE_PROGRESS", raising=False)
    with quiet_terminal(tmp_path / "logs" / "run.log") as c:
        assert os.environ["THINKFORGE_PROGRESS"] == "lines" and sys.stderr is c
        with progress(4, "filter", "rollout", mininterval=0) as bar:
            bar.update(4)
    assert "THINKFORGE_PROGRESS" not in os.environ and sys.stderr is not c
    log = (tmp_path / "logs" / "run.log").read_text()
    assert PROGRESS_MARK + "filter: 100%" in log
