"""`shiftchange demo`, the first thing a newcomer runs: it must work offline,
end to end, and show the handoff and the resume from checkpoints."""

import re
import subprocess
import sys

import pytest

from supervisor.demo import STEPS


@pytest.mark.slow
def test_demo_hands_jobs_over_and_resumes_them_from_checkpoints(tmp_path):
    jobs = 3
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--jobs", str(jobs)],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, shown
    assert re.search(r"handoff committed: jobs 1, 2, 3 requeued", result.stdout), shown
    assert re.search(r"old log: [\d.]+ ms", result.stdout), shown
    resumed = dict(re.findall(r"job (\d+) running on new, resumed at step (\d+)", result.stdout))
    assert sorted(resumed) == ["1", "2", "3"], shown
    assert all(0 < int(step) < STEPS for step in resumed.values()), shown
    assert re.search(r"old exited 0 after", result.stdout), shown
    assert len(re.findall(r"job \d+ succeeded on new", result.stdout)) == jobs, shown
    assert "OK: all 3 jobs moved from old to new" in result.stdout, shown
    assert list(tmp_path.iterdir()) == [], "the demo must leave nothing behind in the working directory"
