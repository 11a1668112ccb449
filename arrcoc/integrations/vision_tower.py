"""Qwen-VL's vision tower in fewer, larger kernels: :func:`pack_vision_tower`.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL attend inside many short sequences packed end to end: each image, and in
Qwen2.5-VL each 112 px window. Without flash-attn installed, transformers runs one attention call per sequence, a
Python loop over ``cu_seqlens`` (about 100 windows x 28 windowed layers for one 1,280 x 960 image), and that loop,
not the arithmetic, is most of the time to first token. :func:`pack_vision_tower` changes up to four things:

- each vision attention layer attends inside every sequence in one kernel call:

  - ``"varlen"``: PyTorch's FlashAttention varlen kernel (``torch.nn.attention.varlen.varlen_attn``), CUDA and
    float16 / bfloat16 only: no padding, no mask;
  - ``"padded"``: the sequences gathered into one padded batch for ``scaled_dot_product_attention`` with a
    key-padding mask, on any device and dtype;
  - ``"auto"`` (the default): ``"varlen"`` where it runs, else ``"padded"``, decided per call;

- the patch embedding, a ``Conv3d`` whose kernel equals its stride over inputs already cut into patches, runs as
  the one matrix product it is (``F.linear`` with the kernel flattened), not through a 3-D convolution;

- a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``: Qwen2.5-VL's) runs gate and up as one matrix product
  with its hidden width padded with zeros to a multiple of 64. Qwen2.5-VL's width, 3,420, leaves its rows off
  the 16-byte alignment Hopper's fast GEMM kernels need, and cuBLAS falls back to kernels about 2.7x slower
  for those three products, nearly half the tower's time (docs/generation.md has the figures); the padded
  weights are made per call (about 26 MB a block in bf16), so that the model holds no second copy;

- ``compile=True``: each vision block is compiled with ``torch.compile`` (regional compilation: one compiled
  block serves all of them; the attention call stays outside), which fuses the elementwise work around the
  matrix products (RMSNorm and rotary embedding in float32, the activation, the residual adds), which took
  about as long as the products themselves. The first call compiles, and a new grid shape compiles once more
  before the shapes turn dynamic.

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
    out = _attend(q, k, v, cu_seqlens, max_seqlen, self._arrcoc_kernel, self._arrcoc_longest)
    return self.proj(out.reshape(n, -1))


class _Longest:
    """The longest sequence of a ``cu_seqlens`` tensor, read on the host once per tensor. The layers of one
    forward share two such tensors (the windows', the images'), so a forward syncs twice, not once a layer."""

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, int]] = []  # the last two, held so that no other tensor takes their place

    def __call__(self, cu_seqlens: Tensor) -> int:
        for tensor, longest in self.seen:
            if tensor is cu_seqlens:
                return longest
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # ok-sync: a shape, as transformers' own loop
        self.seen = [(cu_seqlens, longest), *self.seen[:1]]
        return longest


@torch.compiler.disable  # a compiled block runs up to here and on from here: sizes read on the host stay eager
def _attend(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None, kernel: str, longest: _Longest
) -> Tensor:
    """Attention inside each sequence of ``(N, H, D)`` q, k, v packed end to end; ``(N, H, D)`` out."""
    if max_seqlen is None:
        max_seqlen = longest(cu_seqlens)
    cu_seqlens = cu_seqlens.to(torch.int32)
    if kernel == "varlen" or (kernel == "auto" and _varlen_runs(q)):
        if not _varlen_runs(q):
            raise InvalidInputError(
                "kernel='varlen' needs torch >= 2.10, CUDA and float16/bfloat16 activations; got "
                f"{q.device.type}, {q.dtype} (use kernel='auto' or 'padded')"
            )
        return varlen_attn(q, k, v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return _unpad(_padded(q, k, v, cu_seqlens, max_seqlen), cu_seqlens, q.shape[0])


def _unpad(out: Tensor, cu_seqlens: Tensor, n: int) -> Tensor:
    """``(S, H, L, D)`` padded outputs -> ``(N, H, D)`` in packed order, without reading sizes on the host."""
    token = torch.arange(n, device=out.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], token, right=True)  # (N,) the sequence each token belongs to
    return out[seq, :, token - cu_seqlens[seq]]


#: Matrix sides padded to a multiple of this (64 bf16 elements = 128 bytes) keep GEMMs on their fastest kernels.
_ALIGN = 64


def _gated_mlp_forward(self: nn.Module, hidden_state: Tensor) -> Tensor:
    """``down(act(gate(x)) * up(x))`` with gate and up as one product, the hidden width padded to ``_ALIGN``.

    The padded columns get zero weights and biases, so ``act(0) * 0 = 0`` there and zero ``down`` weights
    ignore them: the same function, rounded by other kernels.
    """
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    width = gate.out_features
    padded = -(-width // _ALIGN) * _ALIGN
    weight = gate.weight.new_zeros(2 * padded, gate.in_features)
    weight[:width], weight[padded : padded + width] = gate.weight, up.weight
    bias = None
    if gate.bias is not None or up.bias is not None:
        bias = gate.weight.new_zeros(2 * padded)
        for start, layer in ((0, gate), (padded, up)):
            if layer.bias is not None:
                bias[start : start + width] = layer.bias
    gated, value = F.linear(hidden_state, weight, bias).split(padded, dim=-1)
    return F.linear(self.act_fn(gated) * value, F.pad(down.weight, (0, padded - width)), down.bias)


def _is_gated_mlp(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and (
        hasattr(mlp, "act_fn")
    )


def _patch_embed_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """The patch embedding as one matrix product: each row of ``hidden_states`` is one flattened patch."""
    weight = self.proj.weight  # (E, C, T, P, P): a kernel that covers the whole patch
    return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1), self.proj.bias)


def pack_vision_tower(
    model: nn.Module, kernel: str = "auto", *, patch_embed: bool = True, mlp: bool = True, compile: bool = False
) -> int:
    """Run a Qwen-VL vision tower with one attention call per layer, its patch embedding as one matrix
    product, its gated MLPs aligned, and optionally its blocks compiled (module docstring).

    Args:
        model: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration`` (or its inner ``.model``), changed in place.
        kernel: the attention kernel, ``"auto"``, ``"varlen"`` or ``"padded"`` (module docstring).
        patch_embed: also run the patch embedding as one matrix product (``False`` leaves its ``Conv3d``).
        mlp: run gated MLPs (Qwen2.5-VL's) as one padded product for gate and up (towers without them: no-op).
        compile: compile each vision block with ``torch.compile`` (needs a working Inductor backend: Triton on
            CUDA, a C++ compiler on the CPU).

    Returns:
        The number of attention layers packed. Calling it again sets every option anew.
    """
    if kernel not in KERNELS:
        raise InvalidInputError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    visual = _tower(model)
    layers = [block.attn for block in visual.blocks]
    longest = _Longest()
    for layer in layers:
        layer._arrcoc_rotary = _rotary(layer)
        layer._arrcoc_kernel = kernel
        layer._arrcoc_longest = longest
        layer.forward = types.MethodType(_forward, layer)
    if patch_embed:
        visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
    else:
        vars(visual.patch_embed).pop("forward", None)
    for block in visual.blocks:
        block_mlp = getattr(block, "mlp", None)
        if mlp and block_mlp is not None and _is_gated_mlp(block_mlp):
            block_mlp.forward = types.MethodType(_gated_mlp_forward, block_mlp)
        elif block_mlp is not None:
            vars(block_mlp).pop("forward", None)
        if compile:
            block.compile()
        else:
            vars(block).pop("_compiled_call_impl", None)
    return len(layers)


def unpack_vision_tower(model: nn.Module) -> int:
    """Undo :func:`pack_vision_tower`: the class forwards again. Returns the attention layers restored."""
    visual = _tower(model)
    restored = 0
    for block in visual.blocks:
        layer = block.attn
        if "forward" in vars(layer):
            del layer.forward, layer._arrcoc_rotary, layer._arrcoc_kernel, layer._arrcoc_longest
            restored += 1
        if getattr(block, "mlp", None) is not None:
            vars(block.mlp).pop("forward", None)
        vars(block).pop("_compiled_call_impl", None)
    vars(visual.patch_embed).pop("forward", None)
    return restored
