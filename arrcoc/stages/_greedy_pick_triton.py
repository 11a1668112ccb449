"""The Triton kernel behind :func:`arrcoc.stages.greedy_pick.greedy_maxmin`: the whole greedy loop in one launch.

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One program per
image: the scores stay in registers (or, past ``REGISTER_LIMIT`` patches, in a ``(B, N)`` work buffer read and
written in chunks), and each step reads one row of ``weighted``. Each step depends on the previous step's argmax,
so the loop is latency-bound: the kernel wins by doing in one launch what the torch loop does in about five
launches per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch", "REGISTER_LIMIT", "CHUNK"]

#: Patches up to which an image's scores live in registers (one block of the next power of two).
REGISTER_LIMIT = 8192
#: Patches per chunk past ``REGISTER_LIMIT``.
CHUNK = 2048


@triton.jit
def _argmax_combine(value_a, index_a, value_b, index_b):
    """torch.argmax's order: NaN above everything, equal values (NaN among them) to the lower index."""
    a_nan = value_a != value_a
    b_nan = value_b != value_b
    b_wins = (value_b > value_a) | (b_nan & ~a_nan) | (((value_b == value_a) | (a_nan & b_nan)) & (index_b < index_a))
    return tl.where(b_wins, value_b, value_a), tl.where(b_wins, index_b, index_a)


@triton.jit
def greedy_maxmin_kernel(
    weighted_ptr,  # (B, N, N) float32, last dim contiguous
    score_ptr,  # (B, N) float32
    live_ptr,  # (B, steps) uint8
    chosen_ptr,  # (B, N) float32 out
    work_ptr,  # (B, N) float32 scratch (CHUNKED only)
    n,
    steps,
    stride_wb,
    stride_wp,
    stride_sb,
    stride_lb,
    stride_cb,
    stride_kb,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    w_image = weighted_ptr + image * stride_wb
    live_image = live_ptr + image * stride_lb
    if not CHUNKED:
        inside = offs < n
        score = tl.load(score_ptr + image * stride_sb + offs, mask=inside, other=float("-inf"))  # (BLOCK,)
        count = tl.zeros([BLOCK], dtype=tl.float32)  # (BLOCK,) times each patch was kept
        for step in range(steps):
            if tl.load(live_image + step) != 0:
                best, pick = tl.reduce((score, offs), 0, _argmax_combine)
                if best > float("-inf"):  # a real patch, not kept yet (NaN compares false, as in torch)
                    count += tl.where(offs == pick, 1.0, 0.0)
                    row = tl.load(w_image + pick * stride_wp + offs, mask=inside, other=float("-inf"))  # (BLOCK,)
                    nearer = tl.minimum(score, row, propagate_nan=tl.PropagateNan.ALL)
                    score = tl.where(step == 0, row, nearer)
        tl.store(chosen_ptr + image * stride_cb + offs, count, mask=inside)
    else:
        # The same loop with the scores in work_ptr: each pass reads and writes a chunk at the same offsets with
        # the same layout, so every thread reads back what it wrote; the barriers keep it so across passes.
        s_image = score_ptr + image * stride_sb
        k_image = work_ptr + image * stride_kb
        c_image = chosen_ptr + image * stride_cb
        for start in range(0, n, BLOCK):
            idx = start + offs
            inside = idx < n
            tl.store(k_image + idx, tl.load(s_image + idx, mask=inside), mask=inside)
            tl.store(c_image + idx, tl.zeros([BLOCK], dtype=tl.float32), mask=inside)
        tl.debug_barrier()
        for step in range(steps):
            if tl.load(live_image + step) != 0:
                chunk = tl.load(k_image + offs, mask=offs < n, other=float("-inf"))
                best, pick = tl.reduce((chunk, offs), 0, _argmax_combine)
                for start in range(BLOCK, n, BLOCK):
                    idx = start + offs
                    chunk = tl.load(k_image + idx, mask=idx < n, other=float("-inf"))
                    value, index = tl.reduce((chunk, idx), 0, _argmax_combine)
                    # a later chunk holds higher indices: it wins only by a higher value (NaN highest)
                    later = (value > best) | ((value != value) & (best == best))
                    best = tl.where(later, value, best)
                    pick = tl.where(later, index, pick)
                if best > float("-inf"):
                    for start in range(0, n, BLOCK):
                        idx = start + offs
                        inside = idx < n
                        row = tl.load(w_image + pick * stride_wp + idx, mask=inside, other=float("-inf"))
                        score = tl.load(k_image + idx, mask=inside, other=float("-inf"))
                        nearer = tl.minimum(score, row, propagate_nan=tl.PropagateNan.ALL)
                        tl.store(k_image + idx, tl.where(step == 0, row, nearer), mask=inside)
                        kept = tl.load(c_image + idx, mask=inside, other=0.0)
                        tl.store(c_image + idx, kept + tl.where(idx == pick, 1.0, 0.0), mask=inside)
                tl.debug_barrier()


def launch(weighted: Tensor, score: Tensor, live: Tensor, chunk: int | None = None) -> Tensor:
    """Run :func:`greedy_maxmin_kernel` on ``weighted`` ``(B, N, N)``, ``score`` ``(B, N)``, ``live`` ``(B, steps)``.

    Args:
        chunk: force the chunked path with this power-of-two chunk (tests); default by ``N``.

    Returns:
        ``(B, N)`` float32 ``chosen``.
    """
    b, n = score.shape
    steps = live.shape[1]
    weighted = weighted.float()
    if weighted.stride(-1) != 1:
        weighted = weighted.contiguous()
    score = score.float().contiguous()
    live = live.contiguous().view(torch.uint8)  # (B, steps) the same bytes
    chosen = torch.empty(b, n, dtype=torch.float32, device=score.device)  # (B, N)
    if b == 0 or n == 0:
        return chosen.zero_()
    block = triton.next_power_of_2(n)
    chunked = chunk is not None or block > REGISTER_LIMIT
    if chunked:
        block = chunk or CHUNK
        work = torch.empty(b, n, dtype=torch.float32, device=score.device)  # (B, N) the scores
    else:
        work = chosen  # unused
    num_warps = max(1, min(16, block // 512))  # about 8-16 scores per thread; one warp reduces without barriers
    strides = (
        weighted.stride(0),
        weighted.stride(1),
        score.stride(0),
        live.stride(0),
        chosen.stride(0),
        work.stride(0),
    )
    with launch_device(score):
        greedy_maxmin_kernel[(b,)](
            weighted, score, live, chosen, work, n, steps, *strides, BLOCK=block, CHUNKED=chunked, num_warps=num_warps
        )
    return chosen
