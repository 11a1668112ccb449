"""Benchmark helpers that every report uses."""

from __future__ import annotations

import pytest
import torch


def test_device_name_names_the_gpu_it_is_given_and_the_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda branch runs only on the lent GPU; here two stand-in GPUs tell whether the name is asked of the
    device the report is about (not of the current one), and the CPU's name follows its thread setting."""
    from arrcoc.tools.bench import device_name

    names = {0: "first GPU", 1: "second GPU"}

    def get_device_name(device: object = None) -> str:
        if device is None:
            return names[0]  # the current device
        return names[device if isinstance(device, int) else torch.device(device).index or 0]

    monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
    assert device_name(torch.device("cuda", 1)) == "second GPU"
    assert device_name(torch.device("cuda", 0)) == "first GPU"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_name(torch.device("cpu"))
        torch.set_num_threads(2)
        two = device_name(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert one.startswith("cpu (") and "1 threads" in one and "2 threads" in two
