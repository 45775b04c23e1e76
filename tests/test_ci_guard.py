"""The CI guards of tests/conftest.py, run on tiny throwaway test files in a pytest subprocess.

Under CI=true a skip (or xfail) outside CI_SKIP_ALLOWLIST fails the run and prints the offending tests and
the allowlist; a run that executes no test fails; every test runs under pytest-timeout. The subprocess
uses a copy of the real conftest.py (with entries appended to its allowlist where a case needs one), so
what is tested is the file CI loads.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _load_conftest():
    # by path: `import conftest` may find tests/reliability/conftest.py, loaded under the same name
    spec = importlib.util.spec_from_file_location("thinkforge_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guard = _load_conftest()
ROOT = TESTS.parent

PASSING = "def test_passes():\n    assert True\n"
SKIPPING = PASSING + "\n\ndef test_skips():\n    pytest.skip('no reason here')\n"


def run_pytest(tmp_path: Path, body: str, *args: str, ci: str | None = "true",
               allow: tuple[tuple[str, str, str], ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir = tmp_path: node ids are test_sample.py::...
    conftest = (TESTS / "conftest.py").read_text()
    conftest += "".join(f"\nCI_SKIP_ALLOWLIST.append({entry!r})\n" for entry in allow)
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_sample.py").write_text("import pytest\n\n" + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(TESTS)) if p)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


def out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_a_skip_outside_the_allowlist_fails_ci_and_names_the_test_and_the_allowlist(tmp_path):
    proc = run_pytest(tmp_path, SKIPPING)
    text = out(proc)
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "1 test(s) skipped outside the CI skip allowlist" in text
    assert "SKIPPED test_sample.py::test_skips: no reason here" in text
    # the allowlist itself is printed, each entry with why it may skip
    for pattern, reason, why in guard.CI_SKIP_ALLOWLIST:
        assert f"{pattern} | {reason} | {why}" in text


def test_outside_ci_a_skip_is_only_reported(tmp_path):
    for ci in (None, "false", ""):
        proc = run_pytest(tmp_path, SKIPPING, ci=ci)
        assert proc.returncode == 0, out(proc)
        assert "CI skip guard" not in out(proc)


def test_an_allowlisted_skip_passes_ci_and_says_why(tmp_path):
    proc = run_pytest(tmp_path, SKIPPING, allow=(("test_sample.py::test_s*", "no reason", "the sample says so"),))
    text = out(proc)
    assert proc.returncode == 0, text
    assert "1 allowed skip(s)" in text and "[allowed: the sample says so]" in text
    assert "outside the CI skip allowlist" not in text


def test_the_allowlist_matches_the_reason_too(tmp_path):
    proc = run_pytest(tmp_path, SKIPPING, allow=(("test_sample.py::test_skips", "another reason", "x"),))
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out(proc)
    assert "SKIPPED test_sample.py::test_skips: no reason here" in out(proc)


def test_every_kind_of_skip_is_caught(tmp_path):
    body = PASSING + textwrap.dedent("""

    @pytest.fixture
    def needs_a_thing():
        pytest.skip("fixture cannot find the thing")


    def test_fixture_skip(needs_a_thing):
        pass


    @pytest.mark.skipif(True, reason="marked off")
    def test_skipif():
        pass


    @pytest.mark.skip(reason="always off")
    def test_skip_mark():
        pass


    @pytest.mark.xfail(reason="known broken")
    def test_xfail():
        assert False


    @pytest.mark.parametrize("n", [1, 2])
    def test_param(n):
        if n == 2:
            pytest.skip("two is off")
    """)
    # `[` in a pattern is literal (no fnmatch classes): this entry allows exactly test_param[2]
    proc = run_pytest(tmp_path, body, allow=(("test_sample.py::test_param[2]", "two is off", "the sample"),))
    text = out(proc)
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "4 test(s) skipped outside" in text
    for line in ("test_sample.py::test_fixture_skip: fixture cannot find the thing",
                 "test_sample.py::test_skipif: marked off", "test_sample.py::test_skip_mark: always off",
                 "test_sample.py::test_xfail: xfail: known broken"):
        assert f"SKIPPED {line}" in text
    assert "1 allowed skip(s)" in text and "skipped test_sample.py::test_param[2]: two is off" in text


def test_a_module_skipped_at_collection_fails_ci(tmp_path):
    proc = run_pytest(tmp_path, "pytest.importorskip('no_such_module_here')\n\n" + PASSING)
    text = out(proc)
    assert proc.returncode != 0, text
    assert "SKIPPED test_sample.py: could not import 'no_such_module_here'" in text


def test_ci_fails_a_run_that_executes_no_test(tmp_path):
    # every test skipped, each one allowed: still nothing was tested
    proc = run_pytest(tmp_path, "def test_skips():\n    pytest.skip('off')\n",
                      allow=(("test_sample.py::*", "off", "sample"),))
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out(proc)
    assert "CI=true: no test was executed" in out(proc)
    # all deselected
    proc = run_pytest(tmp_path, PASSING, "-k", "nothing_matches")
    assert proc.returncode != 0 and "CI=true: no test was executed" in out(proc), out(proc)
    # and outside CI the same all-skipped run passes
    proc = run_pytest(tmp_path, "def test_skips():\n    pytest.skip('off')\n", ci=None)
    assert proc.returncode == 0, out(proc)


def test_a_hung_test_fails_on_its_timeout_and_the_run_goes_on(tmp_path):
    """The signal method interrupts a test blocked on a subprocess (what the slow tests do) and kills the
    child; the tests after it still run."""
    body = """
    import subprocess, sys


    def test_hangs():
        subprocess.run([sys.executable, "-c", "import time; time.sleep(120)"], check=True)


    def test_after():
        assert True
    """
    start = time.monotonic()
    proc = run_pytest(tmp_path, body, "-o", "timeout=3", "-o", "timeout_method=signal")
    text = out(proc)
    assert time.monotonic() - start < 60, text
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "Timeout (0:00:03)" in text or "Timeout" in text
    assert re.search(r"1 failed, 1 passed", text), text


def test_the_repository_runs_every_test_under_a_timeout(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is a test dependency"
    assert float(request.config.getini("timeout")) >= 600
    assert request.config.getini("timeout_method") == "signal"
    marker = request.node.get_closest_marker("timeout")
    assert marker is None  # this test has the global default, not a LONG_TIMEOUTS mark


def _tests_in(path: Path) -> list[str]:
    return re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), flags=re.M)


@pytest.mark.parametrize("pattern", list(guard.LONG_TIMEOUTS) + [p for p, _, _ in guard.CI_SKIP_ALLOWLIST])
def test_every_allowlist_and_long_timeout_entry_names_real_tests(pattern):
    """Entries must not rot: each names an existing file and matches at least one test in it; an
    allowlisted reason is text that file, or a fixture plugin of tests/plugins, really skips with."""
    file, _, name = pattern.partition("::")
    path = ROOT / file
    assert path.is_file(), pattern
    names = _tests_in(path)
    assert any(guard._matches(name, n) for n in names), f"{pattern}: no test matches in {file}"
    for p, reason, why in guard.CI_SKIP_ALLOWLIST:
        if p == pattern:
            sources = [path.read_text(), *(f.read_text() for f in (ROOT / "tests" / "plugins").glob("*.py"))]
            assert any(reason in text for text in sources) and len(why) > 20, pattern
    assert guard.LONG_TIMEOUTS.get(pattern, (901,))[0] > 900


def test_the_allowlist_stays_short():
    assert len(guard.CI_SKIP_ALLOWLIST) <= 5, "each entry hides a test from CI: make the test run instead"


def test_ci_entry_point_turns_the_guard_on():
    text = (ROOT / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in text
