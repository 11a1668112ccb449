"""The shipped weights travel in the wheel: an install outside the checkout loads the trained models."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_loads_the_trained_default(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            os.fspath(dist),
            os.fspath(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("arrcoc-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # torch and timm from this interpreter
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, os.fspath(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = f"""
import torch, arrcoc
from pathlib import Path
from safetensors.torch import load_file
assert Path(arrcoc.__file__).resolve().is_relative_to(Path({os.fspath(env_dir)!r}).resolve()), arrcoc.__file__
pipe = arrcoc.Pipeline.from_pretrained()
shipped = load_file(Path(arrcoc.__file__).parent / "weights" / "encoder.safetensors")
state = pipe.backbone.state_dict()
assert all(torch.equal(state[k], v) for k, v in shipped.items()), "the encoder is not the shipped one"
assert pipe.text_encoder is not None, "no trained text query encoder"
print(pipe.weights_path)
"""
    run = subprocess.run(
        [python, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "site-packages" in run.stdout or os.fspath(env_dir) in run.stdout
