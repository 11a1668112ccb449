"""Shared fixtures: a tiny pipeline built once per session, Triton's interpreter in a subprocess (started in the
background as soon as the tests are collected), and the `cuda` marker's skip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

import arrcoc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config() -> arrcoc.PipelineConfig:
    return arrcoc.PipelineConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_config: arrcoc.PipelineConfig) -> arrcoc.Pipeline:
    """Two ViT-Tiny blocks, random weights: every code path of the default at a fraction of its cost."""
    return arrcoc.Pipeline(tiny_config)


ROOT = Path(__file__).resolve().parent.parent
#: test file -> its interpreted run, started by :func:`pytest_collection_finish`
_INTERPRETED: dict[Path, Future] = {}


def _interpret(test_file: Path) -> Any:
    """Run ``test_file`` as a script under Triton's interpreter (``TRITON_INTERPRET`` must be set before Triton is
    imported, hence a subprocess); the JSON of its last printed line."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",  # one core: the tests run beside it
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(test_file)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the interpreted runs of the collected tests' files now, one after another on a background thread: each
    takes 10-40 s of one core, which the tests collected before them would otherwise leave idle."""
    if importlib.util.find_spec("triton") is None:
        return
    files = sorted({Path(item.path).resolve() for item in session.items if "interpret" in item.fixturenames})
    futures = {f: Future() for f in files}

    def work() -> None:
        for test_file, future in futures.items():
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(_interpret(test_file))
                except BaseException as err:  # handed to the test that reads it
                    future.set_exception(err)

    _INTERPRETED.update(futures)
    if futures:
        threading.Thread(target=work, name="triton-interpreter", daemon=True).start()


@pytest.fixture(scope="session")
def interpret() -> Callable[[str], Any]:
    """``interpret(test_file)``: ``test_file`` run as a script under Triton's interpreter (:func:`_interpret`), from
    the background run started at collection where there is one."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    def run(test_file: str) -> Any:
        future = _INTERPRETED.get(Path(test_file).resolve())
        return future.result() if future is not None else _interpret(Path(test_file))

    return run


@pytest.fixture(scope="module")
def interpreted(request: pytest.FixtureRequest, interpret: Callable[[str], Any]) -> Any:
    """The requesting test file run as a script under Triton's interpreter (:func:`interpret`): what its
    ``__main__`` prints."""
    return interpret(request.module.__file__)
