"""The CLI shows run progress, not the INFO chatter of the libraries it drives."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from normalcy.cli import show_progress_logs
show_progress_logs()
chatty = logging.getLogger("great_expectations.data_context.types.base")
chatty.setLevel(logging.INFO)  # as that module does at import
chatty.info("ephemeral docs site")
logging.getLogger("httpx").info("HTTP Request: POST /api/logs/")
logging.getLogger("httpx").warning("connection retried")
logging.getLogger("normalcy.pipeline.train").info("candidate 1/7: autoencoder")
logging.getLogger("prefect.flow_runs").info("Beginning flow run")
logging.getLogger("normalcyish").info("not ours")
"""


def test_progress_lines_pass_and_library_info_does_not(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "candidate 1/7: autoencoder" in result.stderr
    assert "Beginning flow run" in result.stderr
    assert "connection retried" in result.stderr  # warnings from any library still show
    assert "HTTP Request" not in result.stderr
    assert "ephemeral docs site" not in result.stderr
    assert "not ours" not in result.stderr


def test_logging_configured_by_the_caller_is_left_alone(tmp_path):
    script = (
        "import logging\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from normalcy.cli import show_progress_logs\n"
        "show_progress_logs()\n"
        "logging.getLogger('httpx').info('HTTP Request: kept')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "HTTP Request: kept" in result.stderr
