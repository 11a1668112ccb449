"""Train the small VLM and the text query encoder on the generated world: ``python -m arrcoc.train``.

Time-boxed and resumable: the run stops itself ``--minutes`` after it starts (evaluation included), writes
a checkpoint (``ckpt.pt``: weights, optimiser, step, data position, training seconds so far) every few
minutes and at the end, and ``--resume`` continues from one, with the learning-rate schedule running on
total training time (``--schedule-minutes``) so that several short runs make one long one.

Each step: a batch of generated scenes (DataLoader workers draw them; 224 or 384 pixels, every family equally
often) and their ViT features. Then either all the features go to the language model, or, with probability
``--compress-prob``, arrcoc's own allocation and compression cut them to a random budget (5%-60% of the
patches) with a random relevance map, so that the language model learns to read pooled tokens too; or, with
probability ``--subset-prob``, only 20% of the patches are kept, every object's patches first (a curriculum:
find the asked object among a few dozen tokens before among hundreds). The losses: the answer's
cross-entropy (averaged per sample); the text query encoder's patch-relevance loss (answer boxes as
targets; its gradient reaches the ViT too, weighted by ``--query-weight``); and per-patch colour, kind and
glyph labels from a training-only linear head on the ViT (``--dense-weight``). Training seeds start at
``TRAIN_SEED_START``; evaluation uses seeds from ``EVAL_SEED_START``.

At the end: full-token greedy accuracy per family on held-out seeds at 224 and 384 pixels, printed and written
to ``eval.json``; the weights go to ``OUT/weights`` in the layout ``load_vlm`` and ``Pipeline.from_pretrained``
read.
"""

from __future__ import annotations

import argparse
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

from .allocation import allocate
from .bench import device_name
from .compression import compress
from .data import COLORS, QUESTION_FAMILIES, SHAPES, TEXT_ALPHABET, make_sample
from .regions import region_grid, to_regions
from .text_query import TextQueryConfig, TextQueryEncoder, patch_targets, relevance_loss
from .vlm import VLMConfig, build_vlm, embed_inputs, generate_answers, save_vlm, vision_features

__all__ = ["TRAIN_SEED_START", "EVAL_SEED_START", "SceneBatches", "collate", "random_compression", "evaluate", "main"]

logger = logging.getLogger(__name__)

#: Training scenes use seeds from here on; anything below is held out.
TRAIN_SEED_START = 1_000_000
#: Held-out evaluation seeds start here (far from the seeds tests and examples use).
EVAL_SEED_START = 500_000


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless collated batches of generated samples; batch ``b`` is a pure function of ``(seed, b)``.

    Each batch has one image size (``large_share`` of them 384 pixels, ``batch_size // 3`` samples; the rest
    224 pixels, ``batch_size`` samples) and cycles through ``families``. Workers take every n-th batch.
    """

    def __init__(self, batch_size: int, start_batch: int = 0, seed: int = TRAIN_SEED_START,
                 sizes: Sequence[int] = (224, 384), large_share: float = 0.3,
                 families: Sequence[str] = QUESTION_FAMILIES) -> None:
        self.batch_size, self.start_batch, self.seed = batch_size, start_batch, seed
        self.sizes, self.large_share, self.families = tuple(sizes), large_share, tuple(families)

    def batch(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"batch/{self.seed}/{index}")
        size = self.sizes[-1] if len(self.sizes) > 1 and rng.random() < self.large_share else self.sizes[0]
        count = self.batch_size if size == self.sizes[0] else max(1, self.batch_size * self.sizes[0] ** 2 // size**2)
        offset = rng.randrange(len(self.families))
        samples = [make_sample(self.seed + index * self.batch_size + i, size,
                               self.families[(offset + i) % len(self.families)]) for i in range(count)]
        return collate(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start_batch + worker
        while True:
            yield self.batch(index)
            index += workers


#: Dense per-patch label sets: colour (none + 6), kind (none + shapes + text), glyph (none + alphabet).
DENSE_CLASSES: tuple[int, int, int] = (1 + len(COLORS), 2 + len(SHAPES), 1 + len(TEXT_ALPHABET))


def dense_labels(layout: Sequence[tuple[str, str, tuple[int, int, int, int]]], size: int, patch: int = 16) -> Tensor:
    """``(N, 3)`` int64 per-patch labels (colour, kind, glyph; 0 = none) from a sample's layout.

    A patch takes an entry's labels when its centre lies in the entry's box, or the box's centre in the patch
    (so objects smaller than a patch are labelled too).
    """
    g = size // patch
    labels = np.zeros((g, g, 3), dtype=np.int64)
    colors, kinds = list(COLORS), [*SHAPES, "text"]
    for kind, name, (x0, y0, x1, y1) in layout:
        c0, c1 = max(0, -(-(x0 - patch // 2) // patch)), min(g, -(-(x1 - patch // 2) // patch))
        r0, r1 = max(0, -(-(y0 - patch // 2) // patch)), min(g, -(-(y1 - patch // 2) // patch))
        rows, cols = slice(r0, max(r1, r0)), slice(c0, max(c1, c0))
        cy, cx = min(g - 1, (y0 + y1) // 2 // patch), min(g - 1, (x0 + x1) // 2 // patch)
        if kind == "glyph":
            value, channel = 1 + TEXT_ALPHABET.index(name), 2
        else:
            labels[rows, cols, 0] = labels[cy, cx, 0] = 1 + colors.index(name)
            value, channel = 1 + kinds.index(kind), 1
        labels[rows, cols, channel] = value
        labels[cy, cx, channel] = value
    return torch.from_numpy(labels.reshape(g * g, 3))


def collate(samples: Sequence[Any]) -> dict[str, Any]:
    """Samples of one size -> uint8 pixels ``(B, 3, S, S)``, patch targets ``(B, N)``, dense labels and texts."""
    size = samples[0].image.size[0]
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    return {"pixels": pixels, "targets": torch.stack([patch_targets(s.boxes, size) for s in samples]),
            "dense": torch.stack([dense_labels(s.layout, size) for s in samples]),
            "questions": [s.question for s in samples], "answers": [s.answer for s in samples],
            "families": [s.family for s in samples]}


def random_compression(features: Tensor, generator: torch.Generator, fraction: float, region_size: int = 4,
                       ) -> Tensor:
    """Compress ``(B, N, D)`` square-grid features to ``round(fraction * N)`` tokens with a random relevance map.

    Uses arrcoc's allocation and compression, so the tokens look like the pipeline's (kept patches and
    pooled region means, region by region).
    """
    b, n, d = features.shape
    side = math.isqrt(n)
    grid = features.view(b, side, side, d)
    rh, rw = region_grid((side, side), region_size)
    ones = torch.ones(b, side, side, device=features.device)
    most = to_regions(ones[..., None], region_size)[..., 0].sum(-1).long()  # (B, rh, rw) patches per region
    budget = max(rh * rw, min(n, round(fraction * n)))
    relevance = torch.rand(b, rh, rw, generator=generator, device=features.device) ** 4  # peaked: some detail
    alloc = allocate(relevance.float(), budget, 1, most, check=False)
    tokens, _, _, _ = compress(grid.float(), ones, alloc, budget, region_size)
    return tokens.to(features.dtype)  # (B, budget, D): every slot filled, since allocations sum to the budget


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per answer token, averaged per sample first: every question weighs the same, however long
    its answer (else the many characters of text answers would drown the one-word families)."""
    token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                              ignore_index=-100, reduction="none")  # (B, L-1)
    counted = labels[:, 1:] != -100
    token = torch.where(counted, token, 0.0)  # padding rows may hold NaN logits; never let them in
    return (token.sum(1) / counted.sum(1).clamp_min(1)).mean()


def dense_loss(head: torch.nn.Linear, features: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the per-patch colour, kind and glyph labels from the ViT features (training only)."""
    logits = head(features).float().split(DENSE_CLASSES, dim=-1)  # 3 x (B, N, C)
    return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten())
               for i, lg in enumerate(logits)) / len(logits)


def object_subset(features: Tensor, dense: Tensor, targets: Tensor, generator: torch.Generator,
                  fraction: float = 0.3) -> Tensor:
    """Keep ``round(fraction * N)`` full-detail patches per image, in raster order: every patch that shows an
    object, a text frame or an answer first, then random background patches.

    A curriculum: the language model finds the asked object among a few dozen tokens (all the distractor
    objects still there) before it has to among all of them.
    """
    b, n, d = features.shape
    keep = max(1, round(fraction * n))
    shows = (dense.amax(-1) > 0) | (targets > 0)  # (B, N)
    score = shows.float() * 2 + torch.rand(b, n, generator=generator, device=features.device)
    index = score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K) raster order
    return features.gather(1, index[..., None].expand(-1, -1, d))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, size: int, per_family: int, device: torch.device,
             batch_size: int = 128, seed: int = EVAL_SEED_START) -> dict[str, float]:
    """Full-token greedy accuracy per family on held-out seeds (``per_family`` questions each)."""
    model.eval()
    correct = {f: 0 for f in QUESTION_FAMILIES}
    samples = [make_sample(seed + i, size, QUESTION_FAMILIES[i % len(QUESTION_FAMILIES)])
               for i in range(per_family * len(QUESTION_FAMILIES))]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = collate(chunk)["pixels"].to(device).float() / 255
        with _autocast(device):
            answers = generate_answers(model, tokenizer, [s.question for s in chunk], vision_features(model, pixels))
        for s, a in zip(chunk, answers):
            correct[s.family] += int(a == s.answer)
    return {f: correct[f] / per_family for f in QUESTION_FAMILIES}


def _lr(base: float, seconds: float, schedule: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    progress = min(1.0, seconds / schedule)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _resume(path: Path, model: Any, query_encoder: TextQueryEncoder, dense_head: torch.nn.Module,
            opt: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """Load a ``ckpt.pt`` (everything) or a folder of shipped weights plus its ``eval.json`` (no optimiser state:
    the moments restart, and the warm-up runs again). The folder form is what comes back from a GPU call."""
    if path.is_dir():
        from safetensors.torch import load_file

        from .vlm import vision_tower

        vision_tower(model).load_state_dict(load_file(path / "encoder.safetensors"))
        model.load_state_dict(load_file(path / "vlm.safetensors"), strict=False)
        query_encoder.load_state_dict(TextQueryEncoder.from_pretrained(path).state_dict())
        if (path / "dense_head.safetensors").is_file():
            dense_head.load_state_dict(load_file(path / "dense_head.safetensors"))
        state = json.loads((path / "eval.json").read_text())["state"]
        state["warmup_from"] = state["step"]
        return state
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    query_encoder.load_state_dict(ckpt["query_encoder"])
    dense_head.load_state_dict(ckpt["dense_head"])
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["state"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arrcoc.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for ckpt.pt, eval.json and weights/")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock limit of this run, evaluation included")
    p.add_argument("--resume", help="a ckpt.pt to continue from")
    p.add_argument("--preset", default="default", choices=["default", "tiny"])
    p.add_argument("--batch-size", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--schedule-minutes", type=float, default=20.0, help="training time the cosine schedule spans")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 2)")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--compress-prob", type=float, default=0.15, help="share of batches compressed at random")
    p.add_argument("--subset-prob", type=float, default=0.5, help="share of batches cut to their object patches")
    p.add_argument("--restart-schedule", action="store_true", help="warm-up and cosine schedule start again at resume")
    p.add_argument("--query-weight", type=float, default=0.2)
    p.add_argument("--dense-weight", type=float, default=0.5, help="weight of the per-patch label loss on the ViT")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--eval-per-family", type=int, default=200)
    p.add_argument("--eval-minutes", type=float, default=1.0, help="wall-clock reserved for the final evaluation")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or continue), evaluate, save; returns the summary written to ``OUT/eval.json``."""
    args = _parse(argv)
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

    config = VLMConfig.from_name(args.preset, seed=args.seed)
    model, tokenizer = build_vlm(config)
    width = int(config.encoder_kwargs["embed_dim"])
    qconfig = TextQueryConfig(width=width) if args.preset == "default" else TextQueryConfig(width=width, dim=32, layers=1)
    query_encoder = TextQueryEncoder(qconfig)
    dense_head = torch.nn.Linear(width, sum(DENSE_CLASSES))  # training-only: not shipped
    model.to(device).train()
    query_encoder.to(device).train()
    dense_head.to(device).train()
    params = list(model.parameters()) + list(query_encoder.parameters()) + list(dense_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    state = {"step": 0, "batch": 0, "train_seconds": 0.0, "samples": 0}
    if args.resume:
        state = _resume(Path(args.resume), model, query_encoder, dense_head, opt, device)
        logger.info("resumed from %s at step %d (%.0f s trained)", args.resume, state["step"], state["train_seconds"])
        if args.restart_schedule:
            state["schedule_from"], state["warmup_from"] = state["train_seconds"], state["step"]

    def checkpoint() -> None:
        torch.save({"model": model.state_dict(), "query_encoder": query_encoder.state_dict(),
                    "dense_head": dense_head.state_dict(),
                    "optimizer": opt.state_dict(), "state": state, "config": config.to_dict()}, out / "ckpt.pt")

    sizes = tuple(int(s) for s in args.sizes.split(","))
    workers = args.workers if args.workers is not None else max(0, (torch.multiprocessing.cpu_count() or 2) - 2)
    data = SceneBatches(args.batch_size, start_batch=state["batch"], seed=TRAIN_SEED_START + args.seed, sizes=sizes)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + state["step"])
    schedule = 60 * args.schedule_minutes
    last_ckpt = last_log = time.monotonic()
    running: dict[str, float] = {"lm": 0.0, "query": 0.0, "dense": 0.0, "wait": 0.0, "n": 0}
    from tqdm import tqdm

    progress = tqdm(desc="train", unit="step", initial=state["step"], mininterval=30, disable=None)
    step_start = time.monotonic()
    for batch in loader:
        running["wait"] += time.monotonic() - step_start  # time spent waiting for data
        if time.monotonic() > deadline or (args.max_steps is not None and state["step"] >= args.max_steps):
            break
        lr = _lr(args.lr, state["train_seconds"] - state.get("schedule_from", 0.0), schedule,
                 state["step"] - state.get("warmup_from", 0), args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        pixels = batch["pixels"].to(device, non_blocking=True).float() / 255
        targets = batch["targets"].to(device, non_blocking=True)
        dense = batch["dense"].to(device, non_blocking=True)
        with _autocast(device):
            features = vision_features(model, pixels)  # (B, N, D)
            visual = features
            draw = torch.rand((), generator=generator, device=device).item()  # ok-sync: per-batch choice, training loop
            if draw < args.compress_prob:
                fraction = 0.05 + 0.55 * torch.rand((), generator=generator, device=device).item()  # ok-sync: per-batch choice
                visual = random_compression(features, generator, fraction)
            elif draw < args.compress_prob + args.subset_prob:
                visual = object_subset(features, dense, targets, generator, 0.2)
            inputs = tokenizer([tokenizer.prompt(q) for q in batch["questions"]], visual.shape[1],
                               targets=batch["answers"], device=device)
            embeds = embed_inputs(model, inputs["input_ids"], visual)
            logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                           position_ids=inputs["position_ids"]).logits
            lm_loss = answer_loss(logits, inputs["labels"])
            query, qmask = query_encoder(batch["questions"])
            q_loss = relevance_loss(query_encoder, query, qmask, features, targets)
            d_loss = dense_loss(dense_head, features, dense)
            loss = lm_loss + args.query_weight * q_loss + args.dense_weight * d_loss
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
        running["lm"] += float(lm_loss.detach())
        running["query"] += float(q_loss.detach())
        running["dense"] += float(d_loss.detach())
        running["n"] += 1
        if now - last_log > 30 or state["step"] <= 2:
            n = running["n"]
            logger.info("step %d  samples %d  lr %.2e  lm %.4f  query %.4f  dense %.4f  data wait %.0f%%  (%.0f s trained)",
                        state["step"], state["samples"], lr, running["lm"] / n, running["query"] / n,
                        running["dense"] / n, 100 * running["wait"] / max(1e-9, now - last_log), state["train_seconds"])
            running = {"lm": 0.0, "query": 0.0, "dense": 0.0, "wait": 0.0, "n": 0}
            last_log = now
        if now - last_ckpt > 60 * args.checkpoint_minutes:
            checkpoint()
            last_ckpt = now
    progress.close()
    del loader  # stop the workers before evaluation takes the CPUs
    checkpoint()
    model.eval()
    query_encoder.eval()
    save_vlm(model, tokenizer, out / "weights")
    query_encoder.save_pretrained(out / "weights")
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().clone() for k, v in dense_head.state_dict().items()}, out / "dense_head.safetensors")  # ok-sync: saving
    accuracy = {str(size): evaluate(model, tokenizer, size, args.eval_per_family, device) for size in sizes}
    summary = {"state": state, "accuracy": accuracy, "device": device_name(device), "torch": torch.__version__, "args": vars(args), "wall_seconds": time.monotonic() - started}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    for size, per in accuracy.items():
        logger.info("full-token accuracy at %s px: %s", size, "  ".join(f"{f} {a:.3f}" for f, a in per.items()))
    return summary


if __name__ == "__main__":
    main()
