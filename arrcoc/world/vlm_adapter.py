"""The project's small VLM (:mod:`arrcoc.world.vlm`) served through :class:`arrcoc.integrations.hf.ArrcocLlava`.

:class:`ProjectLlava` is the adapter for this model (its features, prompt, tokenizer and image sizes, as hooks);
:func:`pixel_values` turns PIL images into the tensor it reads; :func:`ask` answers questions with a budget.
``arrcoc eval``, ``arrcoc demo`` and the quickstart notebook all go through here.

Importing this module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..integrations.hf import ArrcocLlava

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from ..stages.tokenizer import CharTokenizer

__all__ = ["rgb_values", "pixel_values", "CharTokenizerForHF", "ProjectLlava", "project_adapter", "ask"]


def rgb_values(images: Sequence[Any], device: torch.device | str | None = None) -> Tensor:
    """``(B, 3, S, S)`` RGB values in [0, 1] of same-sized PIL images (what :func:`arrcoc.world.vlm.vision_features`
    reads), on ``device`` (default: the CPU)."""
    from torchvision.transforms.functional import pil_to_tensor

    return (torch.stack([pil_to_tensor(image.convert("RGB")) for image in images]).float() / 255).to(device or "cpu")


def pixel_values(
    model: LlavaForConditionalGeneration, images: Sequence[Any], device: torch.device | str | None = None
) -> Tensor:
    """``(B, 3, S, S)`` pixel values of same-sized PIL images, normalised as the model's timm tower expects.

    Args:
        model: the VLM (its vision tower's data config gives the mean and std).
        images: PIL images, all of one size (multiples of the patch size).
        device: where the tensor goes (default: the CPU).
    """
    import timm.data

    from .vlm import vision_tower

    data = timm.data.resolve_model_data_config(vision_tower(model))
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    return ((rgb_values(images) - mean) / std).to(device or "cpu")


class CharTokenizerForHF:
    """The slice of the Hugging Face tokenizer API that :class:`arrcoc.integrations.hf.ArrcocLlava` reads, over a
    :class:`arrcoc.stages.tokenizer.CharTokenizer`: call with offsets (so the query is the question alone), special
    ids, ``convert_ids_to_tokens`` and ``decode``.
    """

    is_fast = True  # offsets are exact: each token spans its own text (a character, a word or the placeholder)

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.inner = tokenizer
        self.pad_token_id, self.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
        self.eos_token_id, self.image_token_id = tokenizer.eos_token_id, tokenizer.image_token_id
        self.all_special_ids = [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.image_token_id]

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict[str, list[Any]]:
        ids = self.inner.encode(text, add_bos=True)  # <s> first, as in training
        offsets, at = [(0, 0)], 0
        for i in ids[1:]:
            width = len(self.inner.vocab[i])
            offsets.append((at, at + width))
            at += width
        return {"input_ids": ids, "offset_mapping": offsets} if return_offsets_mapping else {"input_ids": ids}

    def convert_ids_to_tokens(self, index: int) -> str:
        return self.inner.vocab[index]

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens)


class ProjectLlava(ArrcocLlava):
    """An :class:`arrcoc.integrations.hf.ArrcocLlava` serving the project's small VLM (:mod:`arrcoc.world.vlm`) as it
    was trained.

    Three things differ from a stock LLaVA, each an overridden hook: the features are the timm tower's
    ``forward_features`` (after the final norm, the numbers :func:`arrcoc.world.vlm.vision_features` trains on,
    not the pre-norm block outputs LLaVA selects); the [CLS] attention of the last block is measured for
    reducers that need it (VisionZip); and the patch grid, hence the full token count, follows each batch's
    image size (the tower runs at 224 and 384). The prompt is the tokenizer's (``<image>\nQ: ...\nA: ``),
    with the question alone as the query; FastV reads layer 2 (or the last layer of a shallower LM).

    Args:
        model, tokenizer: from :func:`arrcoc.world.vlm.load_vlm` or :func:`arrcoc.world.vlm.build_vlm`.
        method: a registered reducer name.
        shared: a dict shared by several adapters over the same model: the tower's output for the last pixel
            tensor seen is kept there, so several methods reading the very same tensor run the tower once.
        text_encoder: the trained :class:`arrcoc.stages.text_query.TextQueryEncoder` shipped with the model; when
            given, the participatory scorer's query is its encoding of each prompt (the question), as in
            :class:`arrcoc.Pipeline` with a text query, instead of the adapter's prompt pull-back.
        reducer_graphs: passed to the adapter (``"auto"``: the reducer replays as a CUDA graph on CUDA;
            ``"off"``: eager).
    """

    _batch_grid: tuple[int, int] | None = None  # set per batch in prepare(), before the base reads the grid

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: CharTokenizer,
        method: str = "arrcoc",
        *,
        shared: dict[str, Any] | None = None,
        text_encoder: Any = None,
        reducer_graphs: str = "auto",
    ) -> None:
        layers = int(model.config.text_config.num_hidden_layers)
        prompt = tokenizer.prompt("{question}").replace("<image>", "{image}")
        super().__init__(
            model,
            CharTokenizerForHF(tokenizer),
            method=method,
            template=prompt,
            fastv_layer=min(2, layers - 1),
            reducer_graphs=reducer_graphs,
        )
        self.shared = shared
        self._questions: list[str] = []
        object.__setattr__(self, "text_encoder", text_encoder)  # held, not registered: it moves with its own model

    @property
    def grid(self) -> tuple[int, int]:
        return self._batch_grid or super().grid

    def grid_of(self, pixels: Tensor) -> tuple[int, int]:
        patch = self.vision_tower.timm_model.patch_embed.patch_size
        return pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1]

    def prepare(self, images: Any, prompts: str | Sequence[str], budget: int) -> Any:
        pixels = self.pixel_values(images)
        self._batch_grid = self.grid_of(pixels)  # host-side set-up: full_tokens and the budget check follow it
        self._questions = [prompts] if isinstance(prompts, str) else list(prompts)
        return super().prepare(pixels, prompts, budget)

    def _query(self, grid: Tensor, embeds: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.text_encoder is None:
            return super()._query(grid, embeds, query_mask)
        query, mask = self.text_encoder(self._questions)  # (B, L, D), (B, L)
        return query.to(grid.device), mask.to(grid.device)

    def features(self, pixel_values: Tensor) -> tuple[Tensor, None, Tensor | None]:
        shared = self.shared
        if shared is not None and shared.get("pixels") is pixel_values:  # the same batch, another method
            return shared["out"]
        tower = self.vision_tower.timm_model
        captured: list[Tensor] = []
        hook = tower.blocks[-1].register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            out = tower.forward_features(pixel_values.to(next(tower.parameters()).dtype))  # (B, P + N, D)
        finally:
            hook.remove()
        gh, gw = self.grid_of(pixel_values)
        grid = out[:, tower.num_prefix_tokens :].unflatten(1, (gh, gw))  # (B, gh, gw, D)
        wanted = shared is not None or "cls_attention" in self.needs
        attention = _last_block_cls_attention(tower, captured[0], (gh, gw)) if wanted else None
        if shared is not None:
            shared.update(pixels=pixel_values, out=(grid, None, attention))
        return grid, None, attention


def project_adapter(
    model: LlavaForConditionalGeneration,
    tokenizer: CharTokenizer,
    method: str,
    shared: dict[str, Any] | None = None,
    text_encoder: Any = None,
    reducer_graphs: str = "auto",
) -> ProjectLlava:
    """:class:`ProjectLlava` for ``method`` (the arguments as there)."""
    return ProjectLlava(
        model, tokenizer, method, shared=shared, text_encoder=text_encoder, reducer_graphs=reducer_graphs
    )


def _last_block_cls_attention(tower: Any, x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, gh, gw)`` head-mean attention of the [CLS] token to each patch in the tower's last block.

    Recomputed from the block's input ``x`` ``(B, P + N, D)`` with its own norm and q/k projections, so it
    holds whatever attention kernel the tower runs.
    """
    block = tower.blocks[-1]
    attn = block.attn
    b, t, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
    return weights.mean(1)[:, 0, tower.num_prefix_tokens :].unflatten(-1, grid)  # (B, gh, gw)


def ask(
    adapter: Any, pixels: Tensor, prompts: Sequence[str], budget: int, max_new_tokens: int = 10
) -> tuple[list[str] | None, Tensor]:
    """Greedy answers from an :class:`arrcoc.integrations.hf.ArrcocLlava` reading ``budget`` tokens per image.

    Args:
        adapter: the adapter (its method picks the reducer).
        pixels: ``(B, 3, S, S)`` from :func:`pixel_values`.
        prompts: one question (or full prompt) per image.
        budget: visual tokens per image.
        max_new_tokens: longest answer; 0 generates nothing (the answers are then ``None``).

    Returns:
        The answers, and the ``(B, K, 4)`` boxes (row, col, height, width in patches) of the tokens read.
    """
    prepared = adapter.prepare(pixels, list(prompts), budget)
    if max_new_tokens == 0:
        return None, prepared.reduced.positions
    new = adapter.model.generate(
        inputs_embeds=prepared.inputs_embeds,
        attention_mask=prepared.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    answers = [adapter.tokenizer.decode(row, skip_special_tokens=True) for row in new.cpu()]  # ok-sync: text
    return answers, prepared.reduced.positions
