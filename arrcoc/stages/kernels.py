"""Where the stages' Triton kernels run: the one rule each stage's switch and check share.

A kernel is switched on where Triton is installed and its environment variable is not ``0`` (read once, at import:
``ARRCOC_PICK_KERNEL``, ``ARRCOC_TEXTURE_KERNEL``, ``ARRCOC_RESIZE_KERNEL``, and the head's ``ARRCOC_SCORER_KERNEL``,
``ARRCOC_SIMILARITY_KERNEL``, ``ARRCOC_NORMALIZE_KERNEL``, ``ARRCOC_PICK_SETUP_KERNEL``, ``ARRCOC_FRAME_KERNEL``,
``ARRCOC_BALANCE_KERNEL``, ``ARRCOC_ALLOCATION_KERNEL``, ``ARRCOC_COMPRESS_KERNEL``); each
module keeps the result as its own flag, which a test or a benchmark may set to ``False``. The head's kernels stand
in for their torch forms only on float32 CUDA tensors that need no gradient, outside ``torch.compile`` (which fuses
the torch forms itself); everywhere else the torch form runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["kernel_enabled", "launch_device", "runs_kernel"]


def kernel_enabled(variable: str) -> bool:
    """Whether the kernel behind the environment variable ``variable`` is switched on (Triton installed, the
    variable unset or not ``"0"``)."""
    return os.environ.get(variable, "1") != "0" and importlib.util.find_spec("triton") is not None


def runs_kernel(tensor: Tensor, enabled: bool) -> bool:
    """Whether a head kernel switched ``enabled`` stands in for its torch form on ``tensor``, its main input."""
    return (
        enabled
        and tensor.is_cuda
        and tensor.dtype == torch.float32
        and not (tensor.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    )


def launch_device(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Where a Triton kernel on ``tensor`` launches: Triton takes the current CUDA device, so make it the tensor's (on
    the CPU, under Triton's interpreter, nothing to set)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
