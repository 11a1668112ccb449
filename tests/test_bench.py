"""Benchmark helpers that every report uses."""

from __future__ import annotations

import pytest
import torch


def test_device_name_reads_the_gpu_name_for_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda branch runs only on the lent GPU; a stand-in name proves it calls the right function."""
    from arrcoc.tools.bench import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    assert device_name(torch.device("cuda", 0)) == "Stand-in GPU"
    assert device_name(torch.device("cpu")).startswith("cpu (")
