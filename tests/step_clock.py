"""Which step of a test was slow. A long test (or the fixture it waits on) names its steps
with `step("...")`; when the test fails, a timeout included, its report lists the steps
with their seconds and names the one still running. A timeout then reads

    FAILED tests/test_zz_ray_job_submit.py::test_ray_job_submit_runs_world_tokenize_and_stage1
      - [slow step: ray job submit jobs/stage1.py, 812 s] Failed: Timeout (>900.0s) ...

and the run ends with a "timeouts" section that says the same untruncated, instead of a
bare 900 s on a machine where nobody watched the test run.

Loaded by tests/conftest.py (`pytest_plugins`); usable from tests and fixtures alike.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

# the run's timeouts: (test id, what it was doing)
_timeouts: list[tuple[str, str]] = []
# [name, start, end, broken] of the current test item's steps, its fixtures' too: end is
# None while it runs; broken when an exception (a timeout's too) left it
_steps: list[list] = []


@contextmanager
def step(name: str):
    """Time the block as one named step of the running test."""
    entry = [name, time.monotonic(), None, False]
    _steps.append(entry)
    try:
        yield
    except BaseException:
        entry[3] = True
        raise
    finally:
        entry[2] = time.monotonic()


def summary(now: float | None = None) -> str:
    """The current item's steps, a line each: seconds and name, the one that broke off
    (or still runs) marked."""
    now = time.monotonic() if now is None else now
    lines = []
    for name, start, end, broken in _steps:
        mark = "  <- still running" if end is None else "  <- broken off" if broken else ""
        lines.append(f"{(end or now) - start:7.1f} s  {name}{mark}")
    return "\n".join(lines)


def interrupted() -> tuple[str, float] | None:
    """The innermost step an exception broke off (what the test was doing when it
    failed or timed out), with its seconds."""
    now = time.monotonic()
    broken = [(name, (end or now) - start) for name, start, end, was in _steps if was or end is None]
    return broken[-1] if broken else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _steps.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not _steps:
        return
    report.sections.append((f"steps ({report.when})", summary()))
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None or "Timeout" not in crash.message:
        return
    running = interrupted()
    if running is not None:
        name, seconds = running
        doing = f"slow step: {name}, {seconds:.0f} s"
    else:
        name, start, end, _ = max(_steps, key=lambda s: s[2] - s[1])
        doing = f"between steps; the longest: {name}, {end - start:.0f} s"
    crash.message = f"[{doing}] {crash.message}"
    _timeouts.append((report.nodeid, doing))


def pytest_terminal_summary(terminalreporter):
    if _timeouts:
        terminalreporter.section("timeouts: what each test was doing")
        for nodeid, doing in _timeouts:
            terminalreporter.write_line(f"{nodeid}: {doing}")
