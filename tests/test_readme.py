"""The README's tour and its pipelines, run as they are written: each shell
block (in a directory with a `.venv` whose activate puts this interpreter's
scripts on PATH) and each Python block, against a real `simplequeued`. A block
is tagged after its language (```sh tour, ```python pipeline). Commands that
fail fail the test."""

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


def tour_blocks(language: str, tag: str = "tour") -> list[str]:
    text = README.read_text()
    return re.findall(rf"^```{language} {tag}\n(.*?)^```$", text, flags=re.S | re.M)


def run_shell_block(
    tag: str, tmp_path: Path, broker_process: Callable[..., Any]
) -> subprocess.CompletedProcess[str]:
    """Run the README's shell block `tag` against a fresh broker; it must succeed."""
    broker = broker_process("--dir", str(tmp_path / "simplequeue-data"))
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = {**os.environ, "SIMPLEQUEUE_BROKER": broker.url}
    [script] = tour_blocks("sh", tag)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def run_python_block(
    tag: str, tmp_path: Path, broker_process: Callable[..., Any]
) -> subprocess.CompletedProcess[str]:
    """Run the README's Python block `tag` against a fresh broker; it must succeed."""
    broker = broker_process("--dir", str(tmp_path / "simplequeue-data"))
    [code] = tour_blocks("python", tag)
    assert DEFAULT_URL in code
    (tmp_path / f"{tag}.py").write_text(code.replace(DEFAULT_URL, broker.url))
    done = subprocess.run(
        [sys.executable, f"{tag}.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_readme_has_its_tour() -> None:
    assert len(tour_blocks("sh")) == 1 and len(tour_blocks("python")) == 1
    first = README.read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    # The first command leaves the CLI on PATH: the tour's commands need it.
    assert ". .venv/bin/activate && pip install -e . && simplequeued" in first


def test_the_shell_tour_runs_as_written(tmp_path: Path, broker_process: Callable[..., Any]) -> None:
    done = run_shell_block("tour", tmp_path, broker_process)
    counts = orjson.loads(done.stdout[done.stdout.rindex("{") :])
    assert (counts["completed"], counts["pending"], counts["enqueued"]) == (4, 0, 4)
    assert re.search(r"^topic +pending +delayed", done.stdout, re.M)  # status --table


def test_the_python_tour_runs_as_written(
    tmp_path: Path, broker_process: Callable[..., Any]
) -> None:
    done = run_python_block("tour", tmp_path, broker_process)
    assert done.stdout.startswith("10 jobs done;")
    assert "'completed': 11" in done.stdout


def test_the_readme_has_its_pipelines() -> None:
    assert len(tour_blocks("sh", "pipeline")) == 1 and len(tour_blocks("python", "pipeline")) == 1


def test_the_shell_pipeline_runs_as_written(
    tmp_path: Path, broker_process: Callable[..., Any]
) -> None:
    done = run_shell_block("pipeline", tmp_path, broker_process)
    counts = orjson.loads(done.stdout[done.stdout.rindex("{") :])
    assert (counts["completed"], counts["pending"], counts["enqueued"]) == (6, 0, 6)
    assert '"result": "to 2"' in done.stdout  # job s1:0:0, the first word's report
    assert "into words" in done.stderr and "into lengths" in done.stderr  # work -Q


def test_the_python_pipeline_runs_as_written(
    tmp_path: Path, broker_process: Callable[..., Any]
) -> None:
    done = run_python_block("pipeline", tmp_path, broker_process)
    assert done.stdout == "6 words; the last: be: 2\n"
