"""The device as reports and logs name it."""

from __future__ import annotations

import platform

import torch

__all__ = ["device_name"]


def device_name(device: torch.device) -> str:
    """The device as reports name it: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
