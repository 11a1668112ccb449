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
  before the shapes turn dynamic (``dynamic=False``: each shape its own static compile). The longest sequence,
  a Python int, reaches the attention call without passing through the compiled block (a new int would compile
  it again), and the pruned tail's rows are padded to a multiple of :data:`TAIL_MULTIPLE` patches
  (:func:`tower_plan`), so that the budgets of one image size compile a handful of shapes, not one each.

The math is the model's own (its ``qkv``, ``proj`` and convolution weights, its module's rotary function, the
default ``1/sqrt(d)`` scale); only the kernels' rounding differs. Weights, config and output shapes are unchanged,
and :func:`unpack_vision_tower` puts the original forwards back.

The tower in two parts, for pruning inside it (:class:`arrcoc.integrations.qwen.ArrcocQwen`'s ``prune_after``):
:func:`tower_plan` makes the batch's indices on the host (with transformers' own helpers), :func:`tower_head` runs
the patch embedding and the first blocks on every patch, :func:`tower_merged` puts those states through the
model's merger for scoring, and :func:`tower_tail` runs the remaining blocks and the merger on the kept merge units
only. Packed or not, the blocks are the model's own modules.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidTypeError

__all__ = [
    "pack_vision_tower",
    "unpack_vision_tower",
    "KERNELS",
    "TAIL_MULTIPLE",
    "TowerPlan",
    "TowerState",
    "default_prune_after",
    "tower_plan",
    "tower_head",
    "tower_merged",
    "tower_tail",
]

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
    """The longest sequence of a ``cu_seqlens`` tensor: told by a caller that knows it on the host
    (:func:`tower_head`, :func:`tower_tail`), else read back once per tensor (the model's own forward: its layers
    share two such tensors, the windows' and the images', so a forward syncs twice, not once a layer).

    Why not pass it to the blocks: a compiled block guards on a Python int argument, so every new longest (each
    budget's) would compile the block again; looked up here, behind the compiler boundary, it is never seen.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, int]] = []  # the last few, held so that no other tensor takes their place

    def tell(self, cu_seqlens: Tensor, longest: int) -> None:
        self.seen = [(cu_seqlens, longest), *self.seen[:3]]

    def __call__(self, cu_seqlens: Tensor) -> int:
        for tensor, longest in self.seen:
            if tensor is cu_seqlens:
                return longest
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # ok-sync: a shape, as transformers' own loop
        self.tell(cu_seqlens, longest)
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
    model: nn.Module,
    kernel: str = "auto",
    *,
    patch_embed: bool = True,
    mlp: bool = True,
    compile: bool = False,
    dynamic: bool | None = None,
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
        dynamic: passed to ``torch.compile``: ``None`` (its default) compiles the first token count statically
            and the second with a dynamic one; ``False`` compiles each token count on its own (as many compiles
            as counts, each up to dynamo's recompile limit), ``True`` dynamic from the start.

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
            block.compile(dynamic=dynamic)
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


# --- the tower in two parts: every patch up to a block, the kept merge units after it ---------------------
@dataclass
class TowerPlan:
    """Index tensors of one batch's run through a Qwen-VL vision tower, made on the host from the images' sizes
    and on the device before the tower starts, so that nothing after it reads a size back.

    Patches come from the image processor in merge-unit order: the ``m x m`` patches of each merged token
    (a *unit*) are contiguous, units in raster order, images end to end. Qwen2.5-VL's blocks read the units in
    *window order* (each window's units contiguous); the others in that raster order.

    Attributes:
        grids: per image ``(gh, gw)``, its merged units.
        unit: ``m * m``, patches per unit.
        position_ids: ``(N, 2)`` int64 each patch's (row, col) in patches, in the order the blocks read patches.
        order: ``(U,)`` int64 the raster unit (counted over the batch) at each window position; ``None`` without
            windows.
        rank: ``(U,)`` int64 each raster unit's window position (``order``'s inverse); ``None`` without windows.
        window_of: ``(U,)`` int64 the window of each window position; ``None`` without windows.
        windows: the number of windows (0 without).
        cu_seqlens: ``(n + 1,)`` int32 patch offsets of the images; ``max_seqlen`` their longest.
        cu_window_seqlens: ``(windows + 1,)`` int32 patch offsets of the windows; ``max_window_seqlen`` their
            longest (``None`` / 0 without windows).
        kept_cu_seqlens: ``(n + 1,)`` int32 patch offsets of the images' kept units (``budgets`` units each),
            and with padding (``kept_rows`` above the kept patches) one more: the padding rows' own sequence;
            ``kept_max_seqlen`` their longest.
        kept_rows: the tail's patch rows: the kept patches, padded up to a multiple of ``tail_multiple``.
        tail_multiple: 1 (no padding) or the multiple (the padding sequence is then always there, maybe empty).
        interp: Qwen3-VL: ``(indices, weights)`` ``(N, taps)``, the taps that resample its learned position
            table to each image; ``None`` otherwise.
    """

    grids: list[tuple[int, int]]
    unit: int
    position_ids: Tensor
    order: Tensor | None
    rank: Tensor | None
    window_of: Tensor | None
    windows: int
    cu_seqlens: Tensor
    max_seqlen: int
    cu_window_seqlens: Tensor | None
    max_window_seqlen: int
    kept_cu_seqlens: Tensor
    kept_max_seqlen: int
    interp: tuple[Tensor, Tensor] | None
    kept_rows: int = 0
    tail_multiple: int = 1


@dataclass
class TowerState:
    """The tower after blocks ``0..stop`` on every patch: what :func:`tower_tail` continues from.

    Attributes:
        hidden: ``(N, D)`` the hidden states after block ``stop``, in the order the blocks read patches.
        position_embeddings: the rotary ``(cos, sin)``, each ``(N, d)``, in the same order.
        stop: the last block run on every patch.
        deep: Qwen3-VL: the hidden states ``(N, D)`` after each DeepStack block at or before ``stop``.
    """

    hidden: Tensor
    position_embeddings: tuple[Tensor, Tensor]
    stop: int
    deep: dict[int, Tensor]


#: The pruned tail's patch rows are padded up to a multiple of this when the blocks are compiled (a sequence of
#: its own, the last, attending to itself): one compiled shape serves every kept count of a bucket; 64 patches
#: (16 merged units) cost at most 63 rows, about 9% at 11% of a 1,280 x 960 image at batch 1, less above.
TAIL_MULTIPLE = 64


def _family(visual: nn.Module) -> str:
    if hasattr(visual, "deepstack_merger_list"):
        return "qwen3_vl"
    return "qwen2_5_vl" if hasattr(visual, "fullatt_block_indexes") else "qwen2_vl"


def _packed(visual: nn.Module) -> bool:
    """Whether :func:`pack_vision_tower` runs the tower's attention."""
    return all(hasattr(block.attn, "_arrcoc_kernel") for block in visual.blocks)


def _compiled(visual: nn.Module) -> bool:
    """Whether :func:`pack_vision_tower` compiled the tower's blocks."""
    return _packed(visual) and any("_compiled_call_impl" in vars(block) for block in visual.blocks)


def default_prune_after(vision_config: Any) -> int:
    """The block after which :class:`arrcoc.integrations.qwen.ArrcocQwen` prunes when asked for ``"auto"``.

    Qwen2.5-VL: its first full-attention block (``fullatt_block_indexes[0]``; 7 of 32 in the released models),
    the first whose features have seen the whole image rather than one 112 px window, so that the scorers
    compare units in context. Towers attending over the whole image in every block (Qwen2-VL, Qwen3-VL): the
    same share of the depth, the last block of its first quarter.
    """
    full = getattr(vision_config, "fullatt_block_indexes", None)
    if full:
        return int(full[0])
    return max(0, int(vision_config.depth) // 4 - 1)


def tower_plan(
    visual: nn.Module,
    grids: list[tuple[int, int]],
    budgets: list[int],
    device: Any,
    tail_multiple: int | None = None,
) -> TowerPlan:
    """The :class:`TowerPlan` of images with merged ``grids`` keeping ``budgets`` units each, on ``device``.

    The indices come from the installed transformers' own helpers (``transformers.vision_utils``), run on the
    host on a host copy of the grid, so they are the model's own.

    ``tail_multiple``: the tail's patch rows are padded up to a multiple of it, the padding one sequence of its
    own after the images' (and after the windows'), attending only to itself and dropped before the merger, so
    the kept units' tokens are the same; ``None``: :data:`TAIL_MULTIPLE` when :func:`pack_vision_tower` compiled
    the blocks (one compiled shape for every kept count of a bucket), else 1. Padding needs the packed kernels
    (they take an empty sequence; the model's own attention does not).
    """
    try:
        from transformers import vision_utils as vu
    except ImportError as err:  # pragma: no cover - transformers before the precomputable helpers
        raise InvalidTypeError(
            "pruning inside the vision tower needs transformers' vision_utils (transformers >= 5.17)"
        ) from err
    m = int(visual.spatial_merge_size)
    unit = m * m
    grid_thw = torch.tensor([(1, gh * m, gw * m) for gh, gw in grids], dtype=torch.long)
    position_ids = vu.get_vision_position_ids(grid_thw, m)  # (N, 2) in the processor's patch order
    sizes = torch.tensor([gh * gw * unit for gh, gw in grids])
    cu_seqlens = F.pad(sizes.cumsum(0, dtype=torch.int32), (1, 0))
    if tail_multiple is None:
        tail_multiple = TAIL_MULTIPLE if _compiled(visual) else 1
    if isinstance(tail_multiple, bool) or not isinstance(tail_multiple, int) or tail_multiple < 1:
        raise InvalidInputError(f"tail_multiple must be a whole number >= 1 or None; got {tail_multiple!r}")
    kept = torch.tensor(budgets) * unit
    rows = int(kept.sum())
    padded = -(-rows // tail_multiple) * tail_multiple if tail_multiple > 1 else rows
    kept_cu_seqlens = F.pad(kept.cumsum(0, dtype=torch.int32), (1, 0))
    if tail_multiple > 1:  # the padding rows' own sequence, always there (maybe empty) so the shape holds still
        kept_cu_seqlens = F.pad(kept_cu_seqlens, (0, 1), value=padded)
    order = rank = window_of = cu_window_seqlens = None
    windows = max_window = 0
    if _family(visual) == "qwen2_5_vl":
        config = visual.config
        order, cu_window_seqlens = vu.get_vision_window_index(grid_thw, m, config.window_size, config.patch_size)
        rank = torch.argsort(order)
        lengths = (cu_window_seqlens[1:] - cu_window_seqlens[:-1]).long()  # (W,) patches per window
        windows, max_window = len(lengths), int(lengths.max())
        window_of = torch.repeat_interleave(torch.arange(windows), lengths // unit)  # (U,) by window position
        position_ids = position_ids.view(-1, unit, 2)[order].flatten(0, 1)  # the blocks' patch order
    interp = None
    if _family(visual) == "qwen3_vl":
        interp = vu.get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=m,
        )

    def to(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device)

    return TowerPlan(
        grids=list(grids),
        unit=unit,
        position_ids=to(position_ids),
        order=to(order),
        rank=to(rank),
        window_of=to(window_of),
        windows=windows,
        cu_seqlens=to(cu_seqlens),
        max_seqlen=int(sizes.max()),
        cu_window_seqlens=to(cu_window_seqlens),
        max_window_seqlen=max_window,
        kept_cu_seqlens=to(kept_cu_seqlens),
        kept_max_seqlen=max(int(kept.max()), padded - rows),
        interp=None if interp is None else (to(interp[0]), to(interp[1])),
        kept_rows=padded,
        tail_multiple=tail_multiple,
    )


def _blocks(
    visual: nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    blocks: range,
    full: tuple[Tensor, int],
    window: tuple[Tensor, int] | None,
    deep: dict[int, Tensor] | None = None,
) -> Tensor:
    """Blocks ``blocks`` on ``hidden``; full-attention blocks read the images' ``full`` (cu_seqlens, longest),
    windowed ones ``window``. Hidden states after DeepStack blocks go into ``deep``.

    Packed, the longest sequences are told to the attention layers' :class:`_Longest` and the blocks get
    ``max_seqlen=None`` (as from the model's own forward): a compiled block never sees the int."""
    full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or ()) if window is not None else None
    taps = set(getattr(visual, "deepstack_visual_indexes", ()) or ())
    told = _packed(visual)
    if told:
        for cu, longest in (full, window) if window is not None else (full,):
            visual.blocks[0].attn._arrcoc_longest.tell(cu, longest)
    for index in blocks:
        cu, longest = full if full_blocks is None or index in full_blocks else window
        hidden = visual.blocks[index](
            hidden, cu_seqlens=cu, max_seqlen=None if told else longest, position_embeddings=position_embeddings
        )
        if deep is not None and index in taps:
            deep[index] = hidden
    return hidden


def tower_head(visual: nn.Module, pixel_values: Tensor, plan: TowerPlan, stop: int) -> TowerState:
    """The vision tower's patch embedding and blocks ``0..stop`` on every patch: the model's own forward up to
    there (the same modules, inputs and order, so the hidden states are the ones it computes)."""
    hidden = visual.patch_embed(pixel_values.type(visual.dtype))  # (N, D)
    if plan.order is not None:  # window order: each unit's patches move together
        hidden = hidden.view(-1, plan.unit, hidden.shape[-1])[plan.order].flatten(0, 1)
    if plan.interp is not None:  # Qwen3-VL's learned positions, resampled to each image
        indices, weights = plan.interp
        hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
    position_embeddings = visual.rotary_pos_emb(hidden, plan.position_ids)
    window = None if plan.cu_window_seqlens is None else (plan.cu_window_seqlens, plan.max_window_seqlen)
    deep: dict[int, Tensor] = {}
    hidden = _blocks(
        visual, hidden, position_embeddings, range(stop + 1), (plan.cu_seqlens, plan.max_seqlen), window, deep
    )
    return TowerState(hidden, position_embeddings, stop, deep)


def tower_merged(visual: nn.Module, state: TowerState, plan: TowerPlan) -> list[Tensor]:
    """The model's patch merger on the hidden states after block ``state.stop``: per image ``(gh, gw, H)`` merged
    units in raster order, in the language model's space (what the last block's states become through it)."""
    merged = visual.merger(state.hidden)  # (U, H) in the blocks' order
    if plan.rank is not None:
        merged = merged[plan.rank]  # (U, H) raster order
    sizes = [gh * gw for gh, gw in plan.grids]
    return [e.unflatten(0, grid) for e, grid in zip(torch.split(merged, sizes), plan.grids)]


def tower_tail(
    visual: nn.Module, state: TowerState, plan: TowerPlan, units: Tensor
) -> tuple[Tensor, list[Tensor] | None]:
    """The blocks after ``state.stop`` and the patch merger on the kept units only.

    Args:
        visual: the vision tower :func:`tower_head` ran.
        state: its output.
        plan: the batch's plan (its ``kept_cu_seqlens`` give each image's number of kept units).
        units: ``(K,)`` int64 the kept units, counted in raster order over the batch, each image's in a run of
            its ``budgets`` entries (the order of the language model's image slots).

    Returns:
        ``(K, H)`` the kept units' merged tokens, in ``units``' order, and for Qwen3-VL the DeepStack features per
        DeepStack layer ``(K, H)`` in the same order (``None`` otherwise). The rotary embeddings are the kept
        patches' own; attention runs inside each image's kept units and, in windowed blocks, inside each window's.
        With the tower packed (:func:`pack_vision_tower`) no host reads: the windows' kept lengths are counted
        on the device (a window may keep none), and their longest is bounded by the full window's. With
        ``plan.tail_multiple`` the rows are padded (zeros, a sequence of their own) up to ``plan.kept_rows``.
    """
    unit = plan.unit
    if plan.tail_multiple > 1 and not _packed(visual):
        raise InvalidInputError("a padded tail (tail_multiple > 1) needs the packed tower (pack_vision_tower)")
    if plan.rank is not None:  # window order, so that each window's kept units are contiguous
        rows, back = torch.sort(plan.rank[units])  # (K,) window positions, their index in ``units``
    else:
        rows, back = units, None
    patches = (rows[:, None] * unit + torch.arange(unit, device=rows.device)).flatten()  # (K * unit,)
    kept = patches.shape[0]
    pad = plan.kept_rows - kept if plan.tail_multiple > 1 else 0
    hidden = F.pad(state.hidden[patches], (0, 0, 0, pad))  # (rows, D): the kept patches, then zeros
    cos, sin = (F.pad(x[patches], (0, 0, 0, pad)) for x in state.position_embeddings)
    window = None
    if plan.window_of is not None:
        counts = torch.zeros(plan.windows, dtype=torch.int32, device=rows.device)
        counts.index_add_(0, plan.window_of[rows], torch.ones_like(rows, dtype=torch.int32))  # kept units a window
        cu_windows = F.pad(counts.cumsum(0, dtype=torch.int32) * unit, (1, 0))  # (W + 1,), empty windows too
        if plan.tail_multiple > 1:  # the padding's own sequence, as in the plan's kept_cu_seqlens
            cu_windows = F.pad(cu_windows, (0, 1), value=plan.kept_rows)
        if not _packed(visual):
            # the model's own attention splits sequences on the host and fails on an empty one: drop them, a read
            # back it would make anyway (the packed kernels take empty sequences and read nothing)
            cu_windows = torch.unique_consecutive(cu_windows)  # ok-sync: the unpacked tower reads sizes back
        window = (cu_windows, max(plan.max_window_seqlen, pad))
    deep: dict[int, Tensor] = {}
    hidden = _blocks(
        visual,
        hidden,
        (cos, sin),
        range(state.stop + 1, len(visual.blocks)),
        (plan.kept_cu_seqlens, plan.kept_max_seqlen),
        window,
        deep,
    )

    def slots(x: Tensor) -> Tensor:  # (K, H) from the blocks' order back to ``units``' order
        return x if back is None else torch.empty_like(x).index_copy_(0, back, x)

    tokens = slots(visual.merger(hidden[:kept]))
    mergers = getattr(visual, "deepstack_merger_list", None)
    if mergers is None:
        return tokens, None
    layers = []
    for merger, index in zip(mergers, visual.deepstack_visual_indexes):
        seen = state.deep.get(index)
        layers.append(slots(merger(seen[patches] if seen is not None else deep[index][:kept])))
    return tokens, layers
