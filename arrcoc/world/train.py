"""Train the small VLM and the text query encoder on the generated world: ``python -m arrcoc.world.train``.

Time-boxed and resumable: the run stops itself ``--minutes`` after it starts (evaluation included), writes
a checkpoint (``ckpt.pt``: weights, optimiser, step, data position, training seconds so far) every few
minutes and at the end, and ``--resume`` continues from one, with the learning-rate schedule running on
total training time (``--schedule-minutes``) so that several short runs make one long one.

Each step: a batch of generated scenes (DataLoader workers draw them; 224 or 384 pixels, every family equally
often) and their ViT features. Then either all the features go to the language model, or, with probability
``--compress-prob``, arrcoc's own allocation and compression cut them to a random budget (from 5% of the patches
up to ``--compress-max``) with a random relevance map, so that the language model learns to read a sparse, uneven
set of patches too; or, with probability ``--subset-prob``, only ``--subset-fraction`` of the patches are kept
(20% by default; with ``--subset-max``, a share drawn per batch up to it), every object's patches first (a
curriculum: find the asked object among a few dozen tokens before among hundreds; with a drawn share, also: the
background left out does not change what is in the image, so counts stay counts). The losses:
the answer's cross-entropy (averaged per sample); grounding, a training-only head on the language model's middle
layer that marks the answer-box visual tokens (``--grounding-weight``); answer attention, one head of the next
layer asked to look from each answer position at that token's evidence (``--attention-weight``); the text query
encoder's patch-relevance loss (answer boxes as targets; its gradient reaches the ViT too, weighted by
``--query-weight``); and per-patch colour, kind, glyph and side labels from a training-only linear head on the ViT
(``--dense-weight``). Training seeds start at ``TRAIN_SEED_START``; evaluation uses seeds from
``EVAL_SEED_START``.

A fine-tune (``--resume FOLDER --freeze-vision``) keeps the ViT and the text query encoder exactly as resumed,
so that everything built on the encoder (the pipeline's features, probes, the participatory scorer) stays valid:
they run without gradients, their two losses (query, dense) are left out, and only the projector, the language
model and its token positions (with the grounding head) learn. The run checks at its end that the frozen tensors
did not move.

At the end: full-token greedy accuracy per family on held-out seeds at 224 and 384 pixels, printed and written
to ``eval.json``; the weights go to ``OUT/weights`` in the layout ``load_vlm`` and ``Pipeline.from_pretrained``
read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import PipelineConfig
from ..runtime.device import device_name
from ..stages.head import RelevanceHead
from ..stages.regions import patch_boxes, region_grid
from ..stages.text_query import TextQueryConfig, TextQueryEncoder, patch_targets, relevance_loss
from ..stages.texture import TEXTURE_CHANNELS
from .data import COLORS, QUESTION_FAMILIES, SHAPES, TEXT_ALPHABET, WORDS, make_sample
from .vlm import VLMConfig, build_vlm, embed_inputs, generate_answers, save_vlm, vision_features, vision_tower

__all__ = [
    "TRAIN_SEED_START",
    "EVAL_SEED_START",
    "SceneBatches",
    "collate",
    "random_compression",
    "evaluate",
    "frozen_snapshot",
    "check_frozen",
    "main",
]

logger = logging.getLogger(__name__)

#: Training scenes use seeds from here on; anything below is held out.
TRAIN_SEED_START = 1_000_000
#: Held-out evaluation seeds start here (far from the seeds tests and examples use).
EVAL_SEED_START = 500_000
#: Smallest share of the patches a compressed training batch keeps (the largest is ``--compress-max``).
COMPRESS_MIN = 0.05


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless collated batches of generated samples; batch ``b`` is a pure function of ``(seed, b)``.

    Each batch has one image size (``large_share`` of them 384 pixels, ``batch_size // 3`` samples; the rest
    224 pixels, ``batch_size`` samples) and cycles through ``families``. Workers take every n-th batch.
    """

    def __init__(
        self,
        batch_size: int,
        start_batch: int = 0,
        seed: int = TRAIN_SEED_START,
        sizes: Sequence[int] = (224, 384),
        large_share: float = 0.3,
        families: Sequence[str] = QUESTION_FAMILIES,
    ) -> None:
        self.batch_size, self.start_batch, self.seed = batch_size, start_batch, seed
        self.sizes, self.large_share, self.families = tuple(sizes), large_share, tuple(families)

    def batch(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"batch/{self.seed}/{index}")
        size = self.sizes[-1] if len(self.sizes) > 1 and rng.random() < self.large_share else self.sizes[0]
        count = self.batch_size if size == self.sizes[0] else max(1, self.batch_size * self.sizes[0] ** 2 // size**2)
        offset = rng.randrange(len(self.families))
        samples = [
            make_sample(self.seed + index * self.batch_size + i, size, self.families[(offset + i) % len(self.families)])
            for i in range(count)
        ]
        return collate(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start_batch + worker
        while True:
            yield self.batch(index)
            index += workers


#: Dense per-patch label sets: colour (none + 6), kind (none + shapes + text), glyph (none + alphabet), and the
#: image half the patch lies in (left, right: the "side" family needs the position to survive into the features).
DENSE_CLASSES: tuple[int, int, int, int] = (1 + len(COLORS), 2 + len(SHAPES), 1 + len(TEXT_ALPHABET), 2)
#: The losses in the log line, in the order the training step stacks them.
LOSS_NAMES: tuple[str, ...] = ("lm", "query", "dense", "grounding", "attention")
#: Longest text to read (the answer positions whose attention is supervised).
MAX_GLYPHS = 5


def _box_patches(box: tuple[int, int, int, int], g: int, patch: int) -> np.ndarray:
    """``(g, g)`` bool: the patches whose centre lies in ``box``, and the patch holding the box's centre
    (so that boxes smaller than a patch mark one too)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((g, g), dtype=bool)
    c0, c1 = max(0, -(-(x0 - patch // 2) // patch)), min(g, -(-(x1 - patch // 2) // patch))
    r0, r1 = max(0, -(-(y0 - patch // 2) // patch)), min(g, -(-(y1 - patch // 2) // patch))
    mask[r0 : max(r1, r0), c0 : max(c1, c0)] = True
    mask[min(g - 1, (y0 + y1) // 2 // patch), min(g - 1, (x0 + x1) // 2 // patch)] = True
    return mask


def dense_labels(layout: Sequence[tuple[str, str, tuple[int, int, int, int]]], size: int, patch: int = 16) -> Tensor:
    """``(N, 4)`` int64 per-patch labels (colour, kind, glyph: 0 = none; side: 0 left, 1 right) from a layout.

    A patch takes an entry's labels when its centre lies in the entry's box, or the box's centre in the patch
    (so objects smaller than a patch are labelled too).
    """
    g = size // patch
    labels = np.zeros((g, g, 4), dtype=np.int64)
    labels[:, g // 2 :, 3] = 1
    colors, kinds = list(COLORS), [*SHAPES, "text"]
    for kind, name, box in layout:
        where = _box_patches(box, g, patch)
        if kind == "glyph":
            labels[where, 2] = 1 + TEXT_ALPHABET.index(name)
        else:
            labels[where, 0] = 1 + colors.index(name)
            labels[where, 1] = 1 + kinds.index(kind)
    return torch.from_numpy(labels.reshape(g * g, 4))


def glyph_targets(sample: Any, size: int, patch: int = 16) -> Tensor:
    """``(MAX_GLYPHS, N)`` float: for a "text" question, row ``i`` marks the patches of the answer's ``i``-th
    glyph (the glyphs inside the asked frame, left to right); zeros otherwise."""
    g = size // patch
    out = np.zeros((MAX_GLYPHS, g * g), dtype=np.float32)
    if sample.family == "text" and sample.boxes:
        fx0, fy0, fx1, fy1 = sample.boxes[0]
        inside = sorted(
            (
                b
                for k, _, b in sample.layout
                if k == "glyph" and fx0 <= b[0] and b[2] <= fx1 and fy0 <= b[1] and b[3] <= fy1
            ),
            key=lambda b: b[0],
        )
        for i, box in enumerate(inside[:MAX_GLYPHS]):
            out[i] = _box_patches(box, g, patch).reshape(-1)
    return torch.from_numpy(out)


def collate(samples: Sequence[Any]) -> dict[str, Any]:
    """Samples of one size -> uint8 pixels ``(B, 3, S, S)``, patch targets ``(B, N)``, dense labels ``(B, N, 4)``,
    glyph targets ``(B, MAX_GLYPHS, N)`` and texts."""
    size = samples[0].image.size[0]
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    return {
        "pixels": pixels,
        "targets": torch.stack([patch_targets(s.boxes, size) for s in samples]),
        "dense": torch.stack([dense_labels(s.layout, size) for s in samples]),
        "glyphs": torch.stack([glyph_targets(s, size) for s in samples]),
        "questions": [s.question for s in samples],
        "answers": [s.answer for s in samples],
        "families": [s.family for s in samples],
    }


def random_compression(
    features: Tensor,
    generator: torch.Generator,
    fraction: float,
    region_size: int = 4,
) -> tuple[Tensor, Tensor]:
    """Compress ``(B, N, D)`` square-grid features to ``round(fraction * N)`` tokens with a random relevance map.

    Uses arrcoc's allocation and compression, so the tokens look like the pipeline's (each region's most
    distinctive patches, region by region).

    Returns:
        The tokens ``(B, K, D)`` and their boxes ``(B, K, 4)`` (row, col, height, width in patches).
    """
    b, n, d = features.shape
    side = math.isqrt(n)
    grid = features.view(b, side, side, d).float()
    rh, rw = region_grid((side, side), region_size)
    budget = max(rh * rw, min(n, round(fraction * n)))
    relevance = torch.rand(b, rh, rw, generator=generator, device=features.device) ** 4  # peaked: some detail
    # the pipeline's own head, on a drawn relevance map: at least one token per region, at most all its patches
    head = RelevanceHead(PipelineConfig(region_size=region_size, min_tokens=1, query_detail=0.0), concurrent=False)
    ones = torch.ones(b, side, side, device=features.device)
    budgets = torch.full((b,), budget, dtype=torch.long, device=features.device)
    no_query = torch.zeros(b, 1, dtype=torch.bool, device=features.device)
    out = head(
        grid,
        grid.new_zeros(b, side, side, len(TEXTURE_CHANNELS)),
        ones,
        grid.new_zeros(b, 1, d),
        no_query,
        budgets,
        budget,
        relevance=relevance.float(),
    )
    return out["tokens"].to(features.dtype), out["positions"]  # every slot filled: allocations sum to the budget


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per answer token, averaged per sample first: every question weighs the same, however long
    its answer (else the many characters of text answers would drown the one-word families)."""
    token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )  # (B, L-1)
    counted = labels[:, 1:] != -100
    token = torch.where(counted, token, 0.0)  # padding rows may hold NaN logits; never let them in
    return (token.sum(1) / counted.sum(1).clamp_min(1)).mean()


def dense_loss(head: torch.nn.Linear, features: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the per-patch colour, kind, glyph and side labels from the ViT features (training only).

    Two labels count on some patches only. The glyph label counts on the patches that hold a glyph: over all
    patches "no glyph" is right for ~97% of them, and the glyph's identity would barely weigh. The side label
    counts on the patches that show something (an object or a text frame), whose features the answer reads;
    background patches learn their side from the background alone (docs/model-card.md).
    """

    def counted_on(where: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        where = where.flatten()
        return torch.where(where, loss, 0.0).sum() / where.sum().clamp_min(1)

    logits = head(features).float().split(DENSE_CLASSES, dim=-1)  # 4 x (B, N, C)
    losses = [
        torch.nn.functional.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten()) for i, lg in enumerate(logits[:2])
    ]
    losses.append(counted_on(labels[..., 2] > 0, logits[2], labels[..., 2]))
    losses.append(counted_on(labels[..., 1] > 0, logits[3], labels[..., 3]))
    return sum(losses) / len(losses)


def draw_share(low: float, high: float, generator: torch.Generator) -> float:
    """A share of the patches drawn uniformly from ``[low, high]`` for one training batch."""
    share = torch.rand((), generator=generator, device=generator.device).item()  # ok-sync: per-batch choice
    return low + (high - low) * share


def object_subset(
    features: Tensor, dense: Tensor, targets: Tensor, generator: torch.Generator, fraction: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Keep ``round(fraction * N)`` full-detail patches per image, in raster order: every patch that shows an
    object, a text frame or an answer first, then random background patches.

    A curriculum: the language model finds the asked object among a few dozen tokens (all the distractor
    objects still there) before it has to among all of them.

    Returns:
        The kept features ``(B, K, D)`` and their patch indices ``(B, K)``.
    """
    b, n, d = features.shape
    keep = max(1, round(fraction * n))
    shows = (dense[..., :3].amax(-1) > 0) | (targets > 0)  # (B, N); the side channel labels every patch
    score = shows.float() * 2 + torch.rand(b, n, generator=generator, device=features.device)
    index = score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K) raster order
    return features.gather(1, index[..., None].expand(-1, -1, d)), index


def grounding_loss(head: torch.nn.Linear, hidden: Tensor, image: Tensor, targets: Tensor) -> Tensor:
    """Balanced binary cross-entropy of "this visual token lies in an answer box", read from the language
    model's hidden state at each visual token (training only).

    With the question before the image, a visual token's state can know the question; this loss teaches the
    middle layer to mark the tokens that answer it, so that the answer's attention has something to find.
    Without it, attention starts uniform over hundreds of tokens and the answer loss alone barely reaches
    any one of them (the first runs stayed at the answer prior for thousands of steps).

    Args:
        hidden: ``(B, L, H)`` a middle layer's states; ``image``: ``(B, L)`` the visual-token positions,
            ``K`` per row; ``targets``: ``(B, K)`` 1 for answer-box tokens.
    """
    b, k = targets.shape
    logits = head(hidden[image].view(b, k, -1)).squeeze(-1).float()  # (B, K)
    positive = targets.sum(1, keepdim=True)
    weight = torch.where(targets > 0, 0.5 / positive.clamp_min(1), 0.5 / (k - positive).clamp_min(1))
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    return (per * weight).sum(1).mean()


class AnswerAttention:
    """One attention head of one language-model layer, read at the answer cue (training only).

    A forward hook on the layer's attention keeps that head's rotated queries and keys; :meth:`loss` then asks
    the head to put its attention, from the last prompt token (where the first answer token is predicted), on
    the answer-box visual tokens. The grounding loss makes those tokens recognisable in the middle layer;
    this one routes the answer to them. Without it the answer position spread its attention over the
    distractor objects too and read their colours and shapes (the first run of both losses: answer-box
    tokens found with AUC 0.98, answers at chance).

    Args:
        model: the VLM; ``layer``: index of the language-model layer (its input is ``hidden_states[layer]``);
        ``head``: the supervised head (the others stay free).
    """

    def __init__(self, model: Any, layer: int, head: int = 0) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.queries: Tensor | None = None
        self.keys: Tensor | None = None
        self._handle = self.attention.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, length, _ = hidden.shape
        dim = module.head_dim
        groups = module.num_key_value_groups
        q = module.q_proj(hidden).view(b, length, -1, dim)[:, :, self.head].unsqueeze(1)  # (B, 1, L, d)
        k = module.k_proj(hidden).view(b, length, -1, dim)[:, :, self.head // groups].unsqueeze(1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.queries, self.keys = q[:, 0], k[:, 0]  # (B, L, d)

    def weights(self, attention_mask: Tensor, cue: Tensor) -> Tensor:
        """``(B, T, L)`` the head's attention from positions ``cue`` ``(B, T)`` to every position (causal,
        padding masked)."""
        if self.queries is None or self.keys is None:
            raise RuntimeError("AnswerAttention.weights() before a forward pass of the model")
        queries = self.queries.gather(1, cue[..., None].expand(-1, -1, self.queries.shape[-1]))  # (B, T, d)
        logits = torch.einsum("btd,bld->btl", queries.float(), self.keys.float()) * self.queries.shape[-1] ** -0.5
        positions = torch.arange(logits.shape[-1], device=cue.device)
        allowed = attention_mask.bool()[:, None] & (positions[None, None] <= cue[..., None])
        return logits.masked_fill(~allowed, float("-inf")).softmax(-1)

    def loss(self, attention_mask: Tensor, labels: Tensor, image: Tensor, targets: Tensor) -> Tensor:
        """``-log`` of the attention mass on the evidence of each answer token, over the (row, token) pairs
        that have any.

        Args:
            attention_mask, labels: the batch's (labels: -100 but on the answer); ``image``: ``(B, L)`` the
                visual-token positions, ``K`` per row; ``targets``: ``(B, T, K)``: row ``t`` marks the visual
                tokens that hold answer token ``t`` (the answer box for a one-word answer; glyph ``t`` of a text).
        """
        b, t, _ = targets.shape
        first = (labels != -100).int().argmax(1)  # the token before answer token t predicts it
        cue = (first[:, None] - 1 + torch.arange(t, device=labels.device)).clamp_max(labels.shape[1] - 1)
        attention = self.weights(attention_mask, cue)  # (B, T, L)
        on_target = torch.zeros_like(attention).masked_scatter(image[:, None].expand_as(attention), targets.float())
        mass = (attention * on_target).sum(-1)  # (B, T)
        counted = targets.sum(-1) > 0
        return torch.where(counted, -(mass + 1e-4).log(), 0.0).sum() / counted.sum().clamp_min(1)

    def close(self) -> None:
        self._handle.remove()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    size: int,
    per_family: int,
    device: torch.device,
    batch_size: int = 128,
    seed: int = EVAL_SEED_START,
) -> dict[str, float]:
    """Full-token greedy accuracy per family on held-out seeds (``per_family`` questions each)."""
    model.eval()
    correct = {f: 0 for f in QUESTION_FAMILIES}
    samples = [
        make_sample(seed + i, size, QUESTION_FAMILIES[i % len(QUESTION_FAMILIES)])
        for i in range(per_family * len(QUESTION_FAMILIES))
    ]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = collate(chunk)["pixels"].to(device).float() / 255
        with _autocast(device):
            answers = generate_answers(model, tokenizer, [s.question for s in chunk], vision_features(model, pixels))
        for s, a in zip(chunk, answers):
            correct[s.family] += int(a == s.answer)
    return {f: correct[f] / per_family for f in QUESTION_FAMILIES}


def frozen_snapshot(parts: dict[str, torch.nn.Module]) -> dict[str, Tensor]:
    """CPU copies of every tensor (parameters and buffers) of ``parts``, keyed ``part/name``: what
    :func:`check_frozen` compares with at the end of a run."""
    return {
        f"{part}/{name}": tensor.detach().cpu().clone()  # ok-sync: once per run, to compare at its end
        for part, module in parts.items()
        for name, tensor in module.state_dict().items()
    }


def check_frozen(parts: dict[str, torch.nn.Module], snapshot: dict[str, Tensor]) -> None:
    """Raise unless every tensor of ``parts`` equals its copy in ``snapshot`` bit for bit.

    Raises:
        RuntimeError: naming the tensors that moved (a frozen part was trained after all: its weights must not
            be saved as the shipped ones).
    """
    now = frozen_snapshot(parts)
    moved = sorted(k for k in snapshot if k not in now or not torch.equal(now[k], snapshot[k]))
    if moved or now.keys() != snapshot.keys():
        raise RuntimeError(f"frozen tensors changed during training: {moved[:5]} ({len(moved)} in all)")


def _lr(base: float, seconds: float, schedule: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    progress = min(1.0, seconds / schedule)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _load_head(head: torch.nn.Linear, state: dict[str, Tensor]) -> None:
    """Load a training head; one saved before label sets were added to it gives the rows it has."""
    if state["weight"].shape == head.weight.shape:
        head.load_state_dict(state)
        return
    rows = min(len(head.weight), len(state["weight"]))
    logger.info(
        "head of %d outputs resumed from one of %d: the first %d rows kept",
        len(head.weight),
        len(state["weight"]),
        rows,
    )
    with torch.no_grad():
        head.weight[:rows].copy_(state["weight"][:rows])
        head.bias[:rows].copy_(state["bias"][:rows])


def _resume(
    path: Path,
    model: Any,
    query_encoder: TextQueryEncoder,
    dense_head: torch.nn.Module,
    grounding_head: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    fresh_language_model: bool = False,
    freeze_vision: bool = False,
) -> dict[str, Any]:
    """Load a ``ckpt.pt`` (everything) or a folder of shipped weights plus its ``eval.json`` (no optimiser state:
    the moments restart, and the warm-up runs again). The folder form is what comes back from a GPU call.

    ``fresh_language_model`` keeps only the ViT and the query encoder (and the dense head) of a folder: the
    projector and language model keep their fresh initialisation. ``freeze_vision`` says whether this run's
    optimiser holds the vision side; a ``ckpt.pt`` must come from a run that froze it alike, since the
    optimiser's state is per parameter.
    """
    if path.is_dir():
        from safetensors.torch import load_file

        from .vlm import load_language_parts

        vision_tower(model).load_state_dict(load_file(path / "encoder.safetensors"))
        if not fresh_language_model:
            lacked = load_language_parts(
                model, load_file(path / "vlm.safetensors"), path / "vlm.safetensors", optional=("token_positions",)
            )
            if lacked:  # --token-positions added: they start at zero
                logger.info("%s has no (or older) token positions: they start at zero", path)
                model.token_positions.reset_parameters()
        query_encoder.load_state_dict(TextQueryEncoder.from_pretrained(path).state_dict())
        for head, name in ((dense_head, "dense_head"), (grounding_head, "grounding_head")):
            if (path / f"{name}.safetensors").is_file() and not (fresh_language_model and name == "grounding_head"):
                _load_head(head, load_file(path / f"{name}.safetensors"))
        state = json.loads((path / "eval.json").read_text())["state"]
        state["warmup_from"] = state["step"]
        return state
    if fresh_language_model:
        raise ValueError("--fresh-lm takes a folder of weights, not a ckpt.pt")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if bool(ckpt["state"].get("freeze_vision", False)) != freeze_vision:
        raise ValueError(
            f"--freeze-vision {'given' if freeze_vision else 'not given'}, but {path} comes from a run "
            f"{'without' if freeze_vision else 'with'} it: resume a folder of weights instead"
        )
    model.load_state_dict(ckpt["model"])
    query_encoder.load_state_dict(ckpt["query_encoder"])
    dense_head.load_state_dict(ckpt["dense_head"])
    if "grounding_head" in ckpt:
        grounding_head.load_state_dict(ckpt["grounding_head"])
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["state"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arrcoc.world.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for ckpt.pt, eval.json and weights/")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock limit of this run, evaluation included")
    p.add_argument("--resume", help="a ckpt.pt to continue from")
    p.add_argument("--preset", default="default", choices=["default", "tiny"])
    p.add_argument("--lm-layers", type=int, default=None, help="language model depth (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--schedule-minutes", type=float, default=20.0, help="training time the cosine schedule spans")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 2)")
    p.add_argument("--sizes", default="224,384")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated question families cycled through in each batch; repeat one to ask it more "
        "often (default: every family, equally)",
    )
    p.add_argument("--compress-prob", type=float, default=0.15, help="share of batches compressed at random")
    p.add_argument(
        "--compress-max",
        type=float,
        default=0.6,
        help=f"largest share of the patches a compressed batch keeps (the smallest is {COMPRESS_MIN:g})",
    )
    p.add_argument("--subset-prob", type=float, default=0.5, help="share of batches cut to their object patches")
    p.add_argument("--restart-schedule", action="store_true", help="warm-up and cosine schedule start again at resume")
    p.add_argument("--query-weight", type=float, default=0.2)
    p.add_argument("--dense-weight", type=float, default=0.5, help="weight of the per-patch label loss on the ViT")
    p.add_argument("--subset-fraction", type=float, default=0.2, help="share of the patches a subset batch keeps")
    p.add_argument(
        "--subset-max",
        type=float,
        default=None,
        help="draw each subset batch's share uniformly from [--subset-fraction, this] (default: fixed)",
    )
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=1.0,
        help="weight of the loss that marks answer-box visual tokens in the language model's middle layer",
    )
    p.add_argument(
        "--attention-weight",
        type=float,
        default=1.0,
        help="weight of the loss that points one attention head at the answer-box visual tokens",
    )
    p.add_argument(
        "--token-positions",
        action="store_true",
        help="add each visual token's 2-D box to it (arrcoc.integrations.token_positions), to a resumed model too",
    )
    p.add_argument(
        "--fresh-lm",
        action="store_true",
        help="with --resume: keep the ViT and query encoder, start the projector and language model anew",
    )
    p.add_argument(
        "--freeze-vision",
        action="store_true",
        help="with --resume: keep the ViT and the text query encoder bit-identical (no gradients, no query or dense "
        "loss) and train the projector, language model and token positions only",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--eval-per-family", type=int, default=200)
    p.add_argument("--eval-minutes", type=float, default=1.0, help="wall-clock reserved for the final evaluation")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or continue), evaluate, save; returns the summary written to ``OUT/eval.json``."""
    args = _parse(argv)
    # Options are checked before anything is built or resumed.
    families = tuple(args.families.split(",")) if args.families else QUESTION_FAMILIES
    unknown = sorted(set(families) - set(QUESTION_FAMILIES))
    if unknown:
        raise ValueError(f"--families: unknown {unknown}; choose from {QUESTION_FAMILIES}")
    if not COMPRESS_MIN <= args.compress_max <= 1:
        raise ValueError(f"--compress-max must be in [{COMPRESS_MIN}, 1], got {args.compress_max}")
    if not 0 < args.subset_fraction <= 1:
        raise ValueError(f"--subset-fraction must be in (0, 1], got {args.subset_fraction}")
    if args.subset_max is not None and not args.subset_fraction <= args.subset_max <= 1:
        raise ValueError(
            f"--subset-max must be in [--subset-fraction, 1] = [{args.subset_fraction}, 1], got {args.subset_max}"
        )
    if args.freeze_vision and not args.resume:
        raise ValueError("--freeze-vision needs --resume: freezing a randomly initialised ViT trains nothing useful")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    deadline = started + 60 * (args.minutes - args.eval_minutes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    overrides = {"num_layers": args.lm_layers} if args.lm_layers else {}
    config = VLMConfig.from_name(args.preset, seed=args.seed, **overrides)
    if args.resume and Path(args.resume).is_dir() and not args.fresh_lm:  # continue the saved model as it is
        saved = VLMConfig(**json.loads((Path(args.resume) / "vlm.json").read_text())["vlm"])
        if args.lm_layers and saved.num_layers != args.lm_layers:
            raise ValueError(
                f"--lm-layers {args.lm_layers} differs from the {saved.num_layers} layers of "
                f"{args.resume}; add --fresh-lm to start a new language model"
            )
        config = saved
    if args.token_positions:
        config = dataclasses.replace(config, token_positions=True)
    model, tokenizer = build_vlm(config)
    width = int(config.encoder_kwargs["embed_dim"])
    qconfig = (
        TextQueryConfig(width=width) if args.preset == "default" else TextQueryConfig(width=width, dim=32, layers=1)
    )
    query_encoder = TextQueryEncoder(qconfig, words=WORDS)  # saved with it: it warns on words it never saw
    dense_head = torch.nn.Linear(width, sum(DENSE_CLASSES))  # training-only: not shipped
    grounding_head = torch.nn.Linear(config.hidden_size, 1)  # training-only: not shipped
    grounding_layer = max(1, config.num_layers // 2)  # index into hidden_states: 0 is the embeddings
    # The layer right after the grounded states reads them (its input is hidden_states[grounding_layer]).
    answer_attention = AnswerAttention(model, min(grounding_layer, config.num_layers - 1))
    model.to(device).train()
    for part in (query_encoder, dense_head, grounding_head):
        part.to(device).train()
    # Frozen parts: no gradients and not in the optimiser, and in eval mode (whatever dropout a ViT preset has).
    frozen = {"vision_tower": vision_tower(model), "query_encoder": query_encoder} if args.freeze_vision else {}
    for part in frozen.values():
        part.requires_grad_(False).eval()
    trained = [model, grounding_head] if args.freeze_vision else [model, query_encoder, dense_head, grounding_head]
    params = [p for part in trained for p in part.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    state = {"step": 0, "batch": 0, "train_seconds": 0.0, "samples": 0}
    if args.resume:
        state = _resume(
            Path(args.resume),
            model,
            query_encoder,
            dense_head,
            grounding_head,
            opt,
            device,
            fresh_language_model=args.fresh_lm,
            freeze_vision=args.freeze_vision,
        )
        logger.info("resumed from %s at step %d (%.0f s trained)", args.resume, state["step"], state["train_seconds"])
        if args.restart_schedule:
            state["schedule_from"], state["warmup_from"] = state["train_seconds"], state["step"]
    state["freeze_vision"] = args.freeze_vision  # a ckpt.pt's optimiser holds the trained parts only
    snapshot = frozen_snapshot(frozen)  # after resuming: what the frozen parts must still be at the end
    if frozen:
        logger.info("frozen: %s (%d tensors)", ", ".join(frozen), len(snapshot))

    def checkpoint() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "query_encoder": query_encoder.state_dict(),
                "dense_head": dense_head.state_dict(),
                "grounding_head": grounding_head.state_dict(),
                "optimizer": opt.state_dict(),
                "state": state,
                "config": config.to_dict(),
            },
            out / "ckpt.pt",
        )

    sizes = tuple(int(s) for s in args.sizes.split(","))
    workers = args.workers if args.workers is not None else max(0, (torch.multiprocessing.cpu_count() or 2) - 2)
    data = SceneBatches(
        args.batch_size, start_batch=state["batch"], seed=TRAIN_SEED_START + args.seed, sizes=sizes, families=families
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + state["step"])
    schedule = 60 * args.schedule_minutes
    last_ckpt = last_log = time.monotonic()
    # Losses since the last log line, summed on the device: read back once per log line, not once per loss and step.
    loss_sum = torch.zeros(len(LOSS_NAMES), device=device)
    logged_steps, waited = 0, 0.0
    from tqdm import tqdm

    progress = tqdm(desc="train", unit="step", initial=state["step"], mininterval=30, disable=None)
    step_start = time.monotonic()
    for batch in loader:
        waited += time.monotonic() - step_start  # time spent waiting for data
        if time.monotonic() > deadline or (args.max_steps is not None and state["step"] >= args.max_steps):
            break
        lr = _lr(
            args.lr,
            state["train_seconds"] - state.get("schedule_from", 0.0),
            schedule,
            state["step"] - state.get("warmup_from", 0),
            args.warmup,
        )
        for group in opt.param_groups:
            group["lr"] = lr
        pixels = batch["pixels"].to(device, non_blocking=True).float() / 255
        targets = batch["targets"].to(device, non_blocking=True)
        dense = batch["dense"].to(device, non_blocking=True)
        with _autocast(device):
            with torch.no_grad() if args.freeze_vision else nullcontext():  # a frozen ViT needs no backward pass
                features = vision_features(model, pixels)  # (B, N, D)
            # Evidence of each answer token: the answer box for one-word answers, glyph by glyph for texts.
            evidence = batch["glyphs"].to(device, non_blocking=True)  # (B, T, N)
            is_text = evidence.sum((1, 2)) > 0
            evidence[:, 0] = torch.where(is_text[:, None], evidence[:, 0], targets)
            visual, visual_targets = features, targets  # visual_targets: None when tokens are pooled
            side = math.isqrt(features.shape[1])
            boxes = None  # every patch: embed_inputs places them
            draw = torch.rand((), generator=generator, device=device).item()  # ok-sync: per-batch choice, training loop
            if draw < args.compress_prob:
                fraction = draw_share(COMPRESS_MIN, args.compress_max, generator)
                (visual, boxes), visual_targets = random_compression(features, generator, fraction), None
            elif draw < args.compress_prob + args.subset_prob:
                fraction = args.subset_fraction
                if args.subset_max is not None:  # background left out at every share: counts must not move
                    fraction = draw_share(fraction, args.subset_max, generator)
                visual, kept = object_subset(features, dense, targets, generator, fraction)
                boxes = patch_boxes(side, side, device)[kept]  # (B, K, 4)
                visual_targets = targets.gather(1, kept)
                evidence = evidence.gather(2, kept[:, None].expand(-1, evidence.shape[1], -1))
            inputs = tokenizer(
                [tokenizer.prompt(q) for q in batch["questions"]],
                visual.shape[1],
                targets=batch["answers"],
                device=device,
            )
            embeds = embed_inputs(model, inputs["input_ids"], visual, boxes, (side, side))
            grounded = args.grounding_weight > 0 and visual_targets is not None
            result = model(
                inputs_embeds=embeds,
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                output_hidden_states=grounded,
            )
            lm_loss = answer_loss(result.logits, inputs["labels"])
            image = inputs["input_ids"] == tokenizer.image_token_id
            g_loss = (
                grounding_loss(grounding_head, result.hidden_states[grounding_layer], image, visual_targets)
                if grounded
                else lm_loss.new_zeros(())
            )
            a_loss = (
                answer_attention.loss(inputs["attention_mask"], inputs["labels"], image, evidence)
                if visual_targets is not None and args.attention_weight > 0
                else lm_loss.new_zeros(())
            )
            if args.freeze_vision:  # both losses train the frozen side only (and the unshipped dense head)
                q_loss = d_loss = lm_loss.new_zeros(())
            else:
                query, qmask = query_encoder(batch["questions"])
                q_loss = relevance_loss(query_encoder, query, qmask, features, targets)
                d_loss = dense_loss(dense_head, features, dense)
            loss = (
                lm_loss
                + args.query_weight * q_loss
                + args.dense_weight * d_loss
                + args.grounding_weight * g_loss
                + args.attention_weight * a_loss
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(norm):  # ok-sync: a non-finite step is skipped, not applied
            opt.step()
        else:
            state["skipped"] = state.get("skipped", 0) + 1
            logger.warning("step %d: non-finite gradient norm, step skipped", state["step"])
        now = time.monotonic()
        state["train_seconds"] += now - step_start
        step_start = now
        state["step"] += 1
        state["batch"] += 1
        state["samples"] += len(batch["questions"])
        progress.update()
        loss_sum += torch.stack([part.detach().float() for part in (lm_loss, q_loss, d_loss, g_loss, a_loss)])
        logged_steps += 1
        if now - last_log > 30 or state["step"] <= 2:
            means = (loss_sum / logged_steps).tolist()  # ok-sync: the log line
            logger.info(
                "step %d  samples %d  lr %.2e  %s  data wait %.0f%%  (%.0f s trained)",
                state["step"],
                state["samples"],
                lr,
                "  ".join(f"{name} {m:.4f}" for name, m in zip(LOSS_NAMES, means)),
                100 * waited / max(1e-9, now - last_log),
                state["train_seconds"],
            )
            loss_sum.zero_()
            logged_steps, waited, last_log = 0, 0.0, now
        if now - last_ckpt > 60 * args.checkpoint_minutes:
            checkpoint()
            last_ckpt = now
    progress.close()
    answer_attention.close()
    del loader  # stop the workers before evaluation takes the CPUs
    check_frozen(frozen, snapshot)  # before anything is saved: frozen weights that moved must not ship
    checkpoint()
    model.eval()
    query_encoder.eval()
    save_vlm(model, tokenizer, out / "weights")
    query_encoder.save_pretrained(out / "weights")
    from safetensors.torch import save_file

    for head, name in ((dense_head, "dense_head"), (grounding_head, "grounding_head")):  # to resume from the folder
        save_file(
            {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},  # ok-sync: saving
            out / f"{name}.safetensors",
        )
    accuracy = {str(size): evaluate(model, tokenizer, size, args.eval_per_family, device) for size in sizes}
    summary = {
        "state": state,
        "accuracy": accuracy,
        "device": device_name(device),
        "torch": torch.__version__,
        "args": vars(args),
        "wall_seconds": time.monotonic() - started,
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    for size, per in accuracy.items():
        logger.info("full-token accuracy at %s px: %s", size, "  ".join(f"{f} {a:.3f}" for f, a in per.items()))
    return summary


if __name__ == "__main__":
    main()
