"""The README's tour, run as it is written: its shell block (in a directory with
a `.venv` whose activate puts this interpreter's scripts on PATH) and its
Python block, against a real `simplequeued`. Commands that fail fail the test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "http://127.0.0.1:8080"


def tour_blocks(language: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"^```{language} tour\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_readme_has_its_tour() -> None:
    assert len(tour_blocks("sh")) == 1 and len(tour_blocks("python")) == 1
    first = README.read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    # The first command leaves the CLI on PATH: the tour's commands need it.
    assert ". .venv/bin/activate && pip install -e . && simplequeued" in first


def test_the_shell_tour_runs_as_written(tmp_path: Path, broker_process: Callable[..., Any]) -> None:
    broker = broker_process("--dir", str(tmp_path / "simplequeue-data"))
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = {**os.environ, "SIMPLEQUEUE_BROKER": broker.url}
    [script] = tour_blocks("sh")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    counts = orjson.loads(done.stdout[done.stdout.rindex("{") :])
    assert (counts["completed"], counts["pending"], counts["enqueued"]) == (4, 0, 4)
    assert "pending" in done.stdout  # the status table


def test_the_python_tour_runs_as_written(
    tmp_path: Path, broker_process: Callable[..., Any]
) -> None:
    broker = broker_process("--dir", str(tmp_path / "simplequeue-data"))
    [code] = tour_blocks("python")
    assert DEFAULT_URL in code
    (tmp_path / "tour.py").write_text(code.replace(DEFAULT_URL, broker.url))
    done = subprocess.run(
        [sys.executable, "tour.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("10 jobs done;")
    assert "'completed': 11" in done.stdout
