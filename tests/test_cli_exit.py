"""The console script ends promptly, yet exit handlers still run and the exit code survives."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, sys
atexit.register(lambda: print("exit handler ran", flush=True))
sys.argv = ["normalcy", "inspect", "does-not-exist.onnx"]
from normalcy.cli import run
run()
print("not reached")
"""


def test_run_keeps_the_exit_code_and_runs_exit_handlers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "exit handler ran" in result.stdout
    assert "not reached" not in result.stdout
    assert "does-not-exist.onnx" in result.stderr  # the one-line user error


def test_rollback_and_promote_without_a_registry_are_user_errors(tmp_path):
    """In a folder with no model yet: one line naming what is missing, exit code 2."""
    for argv, says in (
        (["rollback"], "has no champion to roll back"),
        (["promote", "7"], "has no version '7'"),
    ):
        script = (
            f"import sys\nsys.argv = {['normalcy', *argv]!r}\nfrom normalcy.cli import run\nrun()\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr
