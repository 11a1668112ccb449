"""Qwen-VL's vision tower in fewer, larger kernels: :func:`pack_vision_tower`.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL attend inside many short sequences packed end to end: each image, and in
Qwen2.5-VL each 112 px window. Without flash-attn installed, transformers runs one attention call per sequence, a
Python loop over ``cu_seqlens`` (about 100 windows x 28 windowed layers for one 1,280 x 960 image), and that loop,
not the arithmetic, is most of the time to first token. :func:`pack_vision_tower` changes two things:

- each vision attention layer attends inside every sequence in one kernel call:

  - ``"varlen"``: PyTorch's FlashAttention varlen kernel (``torch.nn.attention.varlen.varlen_attn``), CUDA and
    float16 / bfloat16 only: no padding, no mask;
  - ``"padded"``: the sequences gathered into one padded batch for ``scaled_dot_product_attention`` with a
    key-padding mask, on any device and dtype;
  - ``"auto"`` (the default): ``"varlen"`` where it runs, else ``"padded"``, decided per call;

- the patch embedding, a ``Conv3d`` whose kernel equals its stride over inputs already cut into patches, runs as
  the one matrix product it is (``F.linear`` with the kernel flattened), not through a 3-D convolution.

The math is the model's own (its ``qkv``, ``proj`` and convolution weights, its module's rotary function, the
default ``1/sqrt(d)`` scale); only the kernels' rounding differs. Weights, config and output shapes are unchanged,
and :func:`unpack_vision_tower` puts the original forwards back.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidTypeError

__all__ = ["pack_vision_tower", "unpack_vision_tower", "KERNELS"]

KERNELS = ("auto", "varlen", "padded")

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the padded kernel serves
    varlen_attn = None


def _tower(model: nn.Module) -> nn.Module:
    """The vision tower of a Qwen-VL model (the ...ForConditionalGeneration or its inner model), checked."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    blocks = getattr(visual, "blocks", None)
    layers = [getattr(block, "attn", None) for block in blocks] if blocks is not None else []
    proj = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if (
        not layers
        or not all(hasattr(a, "qkv") and hasattr(a, "proj") and hasattr(a, "num_heads") for a in layers)
        or not isinstance(proj, nn.Conv3d)
        or proj.kernel_size != proj.stride
    ):
        raise InvalidTypeError(
            "model must be a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model whose vision tower has a Conv3d patch embedding "
            f"(kernel = stride) and attention layers with qkv, proj and num_heads; got {type(model).__name__}"
        )
    return visual


def _rotary(layer: nn.Module) -> Any:
    """The rotary function of the layer's own transformers module (each model family defines its own)."""
    rotate = getattr(sys.modules[type(layer).__module__], "apply_rotary_pos_emb_vision", None)
    if rotate is None:
        raise InvalidTypeError(f"{type(layer).__module__} has no apply_rotary_pos_emb_vision to pack {type(layer)}")
    return rotate


def _varlen_runs(q: Tensor) -> bool:
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, longest: int) -> Tensor:
    """Attention inside each packed sequence of ``(N, H, D)`` q, k, v: one padded batch, one SDPA call; the
    outputs stay padded, ``(S, H, L, D)``."""
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
    offset = torch.arange(longest, device=q.device)
    real = offset < lengths[:, None]  # (S, L) True on a sequence's own tokens
    index = torch.where(real, starts[:, None] + offset, 0)  # (S, L) packed position of each slot
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))  # (S, H, L, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])  # (S, H, L, D)


def _forward(
    self: nn.Module,
    hidden_states: Tensor,
    cu_seqlens: Tensor,
    rotary_pos_emb: Tensor | None = None,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    max_seqlen: int | None = None,
    **_: Any,
) -> Tensor:
    """A packed vision attention layer: the layer's own projections and rotary, one kernel call."""
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)  # (N, H, D) each
    if position_embeddings is None:  # transformers before position_embeddings: the rotary angles themselves
        angles = torch.cat((rotary_pos_emb, rotary_pos_emb), -1)
        position_embeddings = (angles.cos(), angles.sin())
    q, k = self._arrcoc_rotary(q, k, *position_embeddings)
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # ok-sync: a shape, as transformers' own loop
    kernel = self._arrcoc_kernel
    if kernel == "varlen" or (kernel == "auto" and _varlen_runs(q)):
        if not _varlen_runs(q):
            raise InvalidInputError(
                "kernel='varlen' needs torch >= 2.10, CUDA and float16/bfloat16 activations; got "
                f"{q.device.type}, {q.dtype} (use kernel='auto' or 'padded')"
            )
        out = varlen_attn(q, k, v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    else:
        out = _unpad(_padded(q, k, v, cu_seqlens, max_seqlen), cu_seqlens, n)
    return self.proj(out.reshape(n, -1))


def _unpad(out: Tensor, cu_seqlens: Tensor, n: int) -> Tensor:
    """``(S, H, L, D)`` padded outputs -> ``(N, H, D)`` in packed order, without reading sizes on the host."""
    token = torch.arange(n, device=out.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], token, right=True)  # (N,) the sequence each token belongs to
    return out[seq, :, token - cu_seqlens[seq]]


def _patch_embed_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """The patch embedding as one matrix product: each row of ``hidden_states`` is one flattened patch."""
    weight = self.proj.weight  # (E, C, T, P, P): a kernel that covers the whole patch
    return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1), self.proj.bias)


def pack_vision_tower(model: nn.Module, kernel: str = "auto", *, patch_embed: bool = True) -> int:
    """Run a Qwen-VL vision tower with one attention call per layer and its patch embedding as one matrix
    product (module docstring).

    Args:
        model: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration`` (or its inner ``.model``), changed in place.
        kernel: the attention kernel, ``"auto"``, ``"varlen"`` or ``"padded"`` (module docstring).
        patch_embed: also run the patch embedding as one matrix product (``False`` leaves its ``Conv3d``).

    Returns:
        The number of attention layers packed. Calling it again only changes the kernel.
    """
    if kernel not in KERNELS:
        raise InvalidInputError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    visual = _tower(model)
    layers = [block.attn for block in visual.blocks]
    for layer in layers:
        layer._arrcoc_rotary = _rotary(layer)
        layer._arrcoc_kernel = kernel
        layer.forward = types.MethodType(_forward, layer)
    if patch_embed:
        visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
    else:
        vars(visual.patch_embed).pop("forward", None)
    return len(layers)


def unpack_vision_tower(model: nn.Module) -> int:
    """Undo :func:`pack_vision_tower`: the class forwards again. Returns the attention layers restored."""
    visual = _tower(model)
    restored = 0
    for layer in (block.attn for block in visual.blocks):
        if "forward" in vars(layer):
            del layer.forward, layer._arrcoc_rotary, layer._arrcoc_kernel
            restored += 1
    vars(visual.patch_embed).pop("forward", None)
    return restored
