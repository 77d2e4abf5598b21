"""A test that runs past its timeout says which of its steps was slow (tests/step_clock.py):
a real pytest run in a subprocess, with pytest-timeout's own timer."""

import os
import subprocess
import sys

from tests.conftest import ROOT

SLOW_TEST = '''
import time
import pytest
from tests.step_clock import step

@pytest.fixture
def prepared():
    with step("prepare the data"):
        time.sleep(0.2)

def test_slow(prepared):
    with step("train"):
        with step("train: the first epoch"):
            time.sleep(0.1)
        with step("train: the second epoch"):
            time.sleep(30)
'''


def test_a_timeout_names_the_step_that_ran_out_of_time(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 3\n")
    (tmp_path / "test_slow.py").write_text(SLOW_TEST)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.step_clock", "-ra", "-p", "no:cacheprovider",
         "test_slow.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    # the one-line summary starts with the innermost step that was running (a narrow
    # terminal cuts the line's end), and the run's last section says it whole
    summary = next(line for line in out.splitlines() if line.startswith("FAILED"))
    assert "[slow step: train: the second epoch, " in summary, summary
    tail = out.split("timeouts: what each test was doing", 1)[1].splitlines()[1]
    assert tail.startswith("test_slow.py::test_slow: slow step: train: the second epoch, ") and tail.endswith(" s"), tail
    # the report lists every step, the fixture's too, and marks the ones the timeout broke off
    assert "steps (call)" in out
    lines = [line for line in out.splitlines() if " s  " in line]
    assert [line.split(" s  ", 1)[1] for line in lines] == [
        "prepare the data", "train  <- broken off", "train: the first epoch",
        "train: the second epoch  <- broken off"], out
    assert float(lines[0].split()[0]) >= 0.2
