"""Graphed decode: a static KV cache and a one-token decode step captured as a CUDA graph.

:class:`GraphedDecoder` runs a Hugging Face Llama-family language model (Llama, Mistral without a sliding
window, Qwen2/3, and the language models of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: RMSNorm, rotary q/k, gated MLP)
from ``inputs_embeds``. It reuses the model's own modules (embedding, norms, q/k/v/o projections, MLP, rotary
embedding, LM head) and owns only what a graph needs:

- a static KV cache per (batch bucket 1/2/4/8/..., cache length bucket), written in place with
  ``index_copy_`` at a slot held in a tensor, so buffer addresses never move;
- positions and the write slot as tensors (``pos``, ``slot``), advanced in place after each step; a
  multimodal-rotary model (Qwen-VL) takes the prompt's ``(3, B, T)`` (time, row, column) positions, and each new
  token continues every axis from the prompt's last position plus one, as the model's own ``generate`` does;
- a key-validity mask ``(B, L)`` (left padding and unwritten slots are False), so padding never reaches
  attention.

The prefill is captured too, per prompt length (with a fixed budget the length repeats); each decode step
replays one graph per bucket. Qwen3-VL's DeepStack features (added to the first layers' hidden states at the image
positions) enter the prefill as dense ``(n, B, T, H)`` additions, zero off the image. On CPU, or with
``graphs=False``, the same step runs eagerly. No host reads happen inside the decode loop: stopping at EOS
is applied to the finished tensor afterwards (tokens after a row's EOS become the pad id).

This avoids transformers' own ``StaticCache`` + ``torch.compile(mode="reduce-overhead")`` path, whose mask
construction and cache classes change between 4.46 and 5.x; the layer arithmetic is the model's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidTypeError
from ..runtime.graphs import capture

__all__ = ["GraphedDecoder", "language_model", "BATCH_BUCKETS"]

logger = logging.getLogger(__name__)

#: Batch sizes a decode graph is captured for; a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
#: Cache lengths are rounded up to a multiple of this, so nearby prompt lengths share a graph.
LENGTH_STEP = 256


def language_model(model: nn.Module) -> nn.Module:
    """A LLaVA's (or causal LM's) base language model: the module owning ``embed_tokens``, ``layers``, ``norm``."""
    for lm in (
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
        getattr(model, "model", None),
        model,
    ):
        if lm is not None and hasattr(lm, "layers") and hasattr(lm, "embed_tokens"):
            return lm
        inner = getattr(lm, "model", None)
        if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
            return inner
    raise InvalidTypeError(
        f"model must hold a Llama-family language model (embed_tokens, layers, norm); got {type(model).__name__}"
    )


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``(B, h, T, hd)`` with ``cos``/``sin`` ``(B, T, hd)``."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def mrope_section(lm: nn.Module) -> list[int] | None:
    """The (time, row, column) split of a multimodal-rotary language model's frequencies (Qwen-VL), else ``None``."""
    section = getattr(getattr(lm, "rotary_emb", None), "mrope_section", None)
    for name in ("rope_parameters", "rope_scaling"):
        rope_config = getattr(lm.config, name, None)
        if section is None and isinstance(rope_config, dict):
            section = rope_config.get("mrope_section")
    return None if section is None else [int(s) for s in section]


def _sections(freq: Tensor, section: list[int]) -> Tensor:
    """``(B, T, hd)`` from per-axis ``(3, B, T, hd)``: each frequency band from its own axis (time, row, column)."""
    return torch.cat([band[i % 3] for i, band in enumerate(freq.split(section * 2, dim=-1))], dim=-1)


@dataclass
class _State:
    """Static buffers of one (batch bucket, cache length): the KV cache, the step's inputs and outputs."""

    keys: list[Tensor]  # per layer (Bb, kv, L, hd)
    values: list[Tensor]
    valid: Tensor  # (Bb, L) bool
    token: Tensor  # (Bb,) int64 the token the next step reads
    pos: Tensor  # (Bb,) int64 its rotary position; (3, Bb) on a multimodal-rotary model
    slot: Tensor  # (1,) int64 the cache slot it is written to
    logits: Tensor | None = None  # (Bb, V) float32 static output of the step
    graph: Any = None  # the captured step
    failed: str | None = None  # why a capture failed (then everything of this state runs eagerly)
    extra: dict[tuple, Any] = field(default_factory=dict)  # prompt key -> (prefill graph, inputs, logits)


class GraphedDecoder:
    """Greedy or sampled decoding from ``inputs_embeds`` with a static KV cache and a CUDA-graphed step.

    Args:
        lm: the base language model (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
        lm_head: the output projection to the vocabulary.
        graphs: capture the decode step as a CUDA graph (default: on CUDA).
    """

    def __init__(self, lm: nn.Module, lm_head: nn.Module, *, graphs: bool | None = None) -> None:
        self.lm = lm
        self.lm_head = lm_head
        config = lm.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            logger.warning("sliding-window attention is not applied by the graphed decoder (full attention)")
        first = lm.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.qk_norm = hasattr(first, "q_norm")  # Qwen3-style per-head norms
        self.gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        self.mrope = mrope_section(lm)  # multimodal rotary: positions (3, B, T)
        self.axes = 1 if self.mrope is None else 3
        self.device = lm.embed_tokens.weight.device
        self.dtype = lm.embed_tokens.weight.dtype
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        self._states: dict[tuple[int, int], _State] = {}
        self._pool: Any = None
        self.captures = 0

    @classmethod
    def from_llava(cls, model: nn.Module, **kwargs: Any) -> GraphedDecoder:
        """A decoder over a ``LlavaForConditionalGeneration`` (or a causal LM)'s language model and head."""
        return cls(language_model(model), model.get_output_embeddings(), **kwargs)

    # --- the layer arithmetic (the model's own modules) -------------------------------------------------
    def _attention_inputs(self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = layer.self_attn
        h = layer.input_layernorm(x)  # (B, T, H)
        q = attn.q_proj(h).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, h, T, hd)
        k = attn.k_proj(h).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)  # (B, kv, T, hd)
        v = attn.v_proj(h).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def _finish_layer(self, layer: nn.Module, x: Tensor, attended: Tensor) -> Tensor:
        x = x + layer.self_attn.o_proj(attended.transpose(1, 2).flatten(2))  # (B, T, H)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _rotary(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` ``(B, T, hd)`` at ``positions`` ``(B, T)`` (``(3, B, T)`` multimodal)."""
        cos, sin = self.lm.rotary_emb(x, positions)
        if cos.ndim == 4:  # transformers versions that leave the (time, row, column) bands to the attention
            cos, sin = _sections(cos, self.mrope), _sections(sin, self.mrope)
        return cos, sin

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(self.lm.norm(x)).float()  # (B, V)

    # --- static state ---------------------------------------------------------------------------------
    def _state(self, bucket: int, length: int) -> _State:
        key = (bucket, length)
        if key not in self._states:
            shape = (bucket, self.kv_heads, length, self.head_dim)
            n = len(self.lm.layers)
            kw = {"device": self.device, "dtype": self.dtype}
            self._states[key] = _State(
                keys=[torch.zeros(shape, **kw) for _ in range(n)],
                values=[torch.zeros(shape, **kw) for _ in range(n)],
                valid=torch.zeros(bucket, length, dtype=torch.bool, device=self.device),
                token=torch.zeros(bucket, dtype=torch.long, device=self.device),
                pos=torch.zeros(self.axes, bucket, dtype=torch.long, device=self.device).squeeze(0),
                slot=torch.zeros(1, dtype=torch.long, device=self.device),
            )
        return self._states[key]

    def release(self) -> None:
        """Drop every cache and graph (frees their memory)."""
        self._states.clear()
        self._pool = None

    # --- prefill and step -----------------------------------------------------------------------------
    def _prefill(
        self, state: _State, embeds: Tensor, mask: Tensor, positions: Tensor, deepstack: Tensor | None
    ) -> Tensor:
        """Fill the cache with the prompt; returns the logits after its last token ``(Bb, V)``.

        ``positions`` ``(Bb, T)`` (``(3, Bb, T)`` multimodal); ``deepstack`` ``(n, Bb, T, H)`` is added to the
        hidden states after each of the first ``n`` layers (Qwen3-VL; zero off the image slots)."""
        b, t, _ = embeds.shape
        mask = mask.bool()
        cos, sin = self._rotary(embeds, positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=embeds.device)
        allowed = ((causal & mask[:, None, :]) | eye)[:, None]  # (Bb, 1, T, T); a pad query sees itself only
        x = embeds
        for i, layer in enumerate(self.lm.layers):
            q, k, v = self._attention_inputs(layer, x, cos, sin)
            state.keys[i][:, :, :t].copy_(k)
            state.values[i][:, :, :t].copy_(v)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **self.gqa)
            x = self._finish_layer(layer, x, attended)
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i]
        state.valid.zero_()
        state.valid[:, :t].copy_(mask)
        state.pos.copy_(positions[..., -1] + 1)  # every axis goes on from the prompt's last position
        state.slot.fill_(t)
        return self._logits(x[:, -1])

    def _step(self, state: _State) -> Tensor:
        """One decode step on the static buffers: read ``token`` at ``pos``, write the cache at ``slot``."""
        x = self.lm.embed_tokens(state.token)[:, None]  # (Bb, 1, H)
        cos, sin = self._rotary(x, state.pos[..., None])
        state.valid.index_fill_(1, state.slot, True)
        allowed = state.valid[:, None, None, :]  # (Bb, 1, 1, L)
        for i, layer in enumerate(self.lm.layers):
            q, k, v = self._attention_inputs(layer, x, cos, sin)
            state.keys[i].index_copy_(2, state.slot, k)
            state.values[i].index_copy_(2, state.slot, v)
            attended = F.scaled_dot_product_attention(q, state.keys[i], state.values[i], attn_mask=allowed, **self.gqa)
            x = self._finish_layer(layer, x, attended)
        return self._logits(x[:, 0])

    def _run_step(self, state: _State) -> Tensor:
        if not self.graphs or state.failed:
            return self._step(state)
        if state.graph is None:
            state.graph, state.logits = self._capture(lambda: self._step(state), "decode step", state)
            if state.graph is None:
                return self._step(state)
        state.graph.replay()
        return state.logits

    def _run_prefill(
        self, state: _State, embeds: Tensor, mask: Tensor, positions: Tensor, deepstack: Tensor | None
    ) -> Tensor:
        """The prefill, replayed as a CUDA graph per prompt length (a fixed budget keeps the length fixed)."""
        inputs = (embeds, mask, positions, deepstack)
        if not self.graphs or state.failed:
            return self._prefill(state, *inputs)
        key = (embeds.shape[1], None if deepstack is None else deepstack.shape[0])
        if key not in state.extra:
            static = tuple(None if x is None else x.clone() for x in inputs)
            graph, logits = self._capture(lambda: self._prefill(state, *static), f"prefill of {key[0]} tokens", state)
            state.extra[key] = (graph, static, logits)
        graph, static, logits = state.extra[key]
        if graph is None:
            return self._prefill(state, *inputs)
        for buffer, x in zip(static, inputs):
            if x is not None:
                buffer.copy_(x)
        graph.replay()
        return logits

    def _capture(self, fn: Any, what: str, state: _State) -> tuple[Any, Tensor | None]:
        """Warm ``fn`` up on a side stream, then capture it; ``(None, None)`` (and one warning) when it fails.

        The warm-up runs repeat exactly what the first replay does (same inputs, same cache slots).
        """
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, out = capture(fn, self._pool, warmup=2)
            self.captures += 1
            return graph, out
        except RuntimeError as err:  # a failed capture falls back to eager, with the reason
            state.failed = f"{what}: {err}"
            logger.warning("%s capture failed (%s); running eagerly", what, err)
            return None, None

    @torch.no_grad()
    def prefill_logits(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        *,
        position_ids: Tensor | None = None,
        deepstack: Tensor | None = None,
    ) -> Tensor:
        """The next-token logits after each left-padded prompt, ``(B, V)`` float32: :meth:`generate`'s first step
        (arguments as there), copied out of the graph's static output."""
        _, logits = self._start(inputs_embeds, attention_mask, 1, position_ids, deepstack)
        return logits[: inputs_embeds.shape[0]].clone()

    def _start(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        position_ids: Tensor | None,
        deepstack: Tensor | None,
    ) -> tuple[_State, Tensor]:
        """Checks the prompt, fills the static state of its (batch bucket, cache length), runs the prefill."""
        if inputs_embeds.ndim != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
            raise InvalidInputError(
                f"inputs_embeds must be (B, T, H) and attention_mask (B, T); got "
                f"{tuple(inputs_embeds.shape)} and {tuple(attention_mask.shape)}"
            )
        b, t, h = inputs_embeds.shape
        want = (b, t) if self.axes == 1 else (3, b, t)
        if position_ids is not None and tuple(position_ids.shape) not in (want, (b, t)):
            raise InvalidInputError(
                f"position_ids must be {want} for this language model; got {tuple(position_ids.shape)}"
            )
        if deepstack is not None and (deepstack.ndim != 4 or tuple(deepstack.shape[1:]) != (b, t, h)):
            raise InvalidInputError(f"deepstack must be (n, {b}, {t}, {h}); got {tuple(deepstack.shape)}")
        bucket = next((s for s in BATCH_BUCKETS if s >= b), b)
        length = -(-(t + max_new_tokens) // LENGTH_STEP) * LENGTH_STEP
        state = self._state(bucket, length)
        embeds = inputs_embeds.to(self.device, self.dtype)
        mask = attention_mask.to(self.device)
        if position_ids is None:  # as transformers' generate counts them
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        positions = position_ids.to(self.device).expand(*want[:-2], b, t)
        if deepstack is not None:
            deepstack = deepstack.to(self.device, self.dtype)
        if bucket > b:  # filler rows repeat row 0; their tokens are dropped
            embeds = torch.cat((embeds, embeds[:1].expand(bucket - b, -1, -1)))
            mask = torch.cat((mask, mask[:1].expand(bucket - b, -1)))
            positions = torch.cat((positions, positions[..., :1, :].expand(*want[:-2], bucket - b, t)), -2)
            if deepstack is not None:
                deepstack = torch.cat((deepstack, deepstack[:, :1].expand(-1, bucket - b, -1, -1)), 1)
        return state, self._run_prefill(state, embeds, mask, positions, deepstack)

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        position_ids: Tensor | None = None,
        deepstack: Tensor | None = None,
    ) -> Tensor:
        """Decode ``max_new_tokens`` after left-padded prompts.

        Args:
            inputs_embeds: ``(B, T, H)`` prompt embeddings, left padded.
            attention_mask: ``(B, T)`` 1 on real tokens.
            position_ids: the prompt's rotary positions, ``(B, T)``, or ``(3, B, T)`` (time, row, column) on a
                multimodal-rotary model (Qwen-VL); default: counted along each row's real tokens, on every axis.
            deepstack: ``(n, B, T, H)`` added to the hidden states after each of the first ``n`` layers during the
                prefill (Qwen3-VL's DeepStack features at the image slots, zero elsewhere).
            max_new_tokens: tokens to produce per row.
            do_sample: sample from ``softmax(logits / temperature)`` instead of taking the argmax.
            eos_token_id: tokens after a row's first EOS are replaced by ``pad_token_id``.

        Returns:
            ``(B, max_new_tokens)`` int64 token ids.
        """
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise InvalidInputError(f"temperature must be > 0 when sampling; got {temperature}")
        b = inputs_embeds.shape[0]
        state, logits = self._start(inputs_embeds, attention_mask, max_new_tokens, position_ids, deepstack)
        out = torch.empty(state.token.shape[0], max_new_tokens, dtype=torch.long, device=self.device)
        for i in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits / temperature, -1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(-1)
            out[:, i] = token
            if i + 1 == max_new_tokens:
                break
            state.token.copy_(token)
            logits = self._run_step(state)
            state.pos.add_(1)
            state.slot.add_(1)
        out = out[:b]
        if eos_token_id is not None:
            eos = torch.tensor(
                [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=out.device
            )
            hit = torch.isin(out, eos).long().cumsum(-1)  # (B, new)
            after = (hit - torch.isin(out, eos).long()) > 0  # strictly after the first EOS
            out = out.masked_fill(after, pad_token_id)
        return out
