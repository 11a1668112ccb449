"""The trained text query encoder of the participatory scorer: question text -> query tokens in the ViT's space.

A small character transformer reads the question; ``num_queries`` learned slots attend to it and are
projected to the encoder width ``D``. It is trained (``python -m arrcoc.world.train``) so that the best cosine
between a patch feature and the query tokens, exactly what :class:`~arrcoc.stages.scorers.ParticipatoryScorer`
takes, predicts whether the patch lies in the boxes that hold the answer (:func:`relevance_loss`).

It knows the words of the world it was trained on (the generated scenes' colours, shapes, sides and question
words) and nothing else: a question with other words is read, but those words are noise to it, and it says
so with a warning naming them.

Saved as one safetensors file whose metadata holds the config and the words: ``text_query.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError, MissingWeightsError
from .tokenizer import CharTokenizer

__all__ = ["TextQueryConfig", "TextQueryEncoder", "relevance_loss", "patch_targets", "TEXT_QUERY_FILE"]

logger = logging.getLogger(__name__)

TEXT_QUERY_FILE = "text_query.safetensors"

#: A word, for the vocabulary check: a run of two or more letters (single letters are spelled, never unknown).
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass(frozen=True)
class TextQueryConfig:
    """Sizes of the query encoder.

    Attributes:
        width: ``D``, the vision encoder's feature width the queries live in.
        dim, layers, heads: the character transformer.
        num_queries: ``L``, query tokens per question.
        max_chars: longest question read (longer ones are cut).
    """

    width: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    num_queries: int = 4
    max_chars: int = 96

    def __post_init__(self) -> None:
        if min(self.width, self.dim, self.layers, self.heads, self.num_queries, self.max_chars) < 1:
            raise InvalidInputError(f"every TextQueryConfig size must be >= 1; got {self}")
        if self.dim % self.heads:
            raise InvalidInputError(f"dim {self.dim} must be a multiple of heads {self.heads}")


class TextQueryEncoder(nn.Module):
    """Question strings -> ``(B, L, D)`` query tokens and a ``(B, L)`` bool mask (all True: every slot is real).

    Args:
        config: sizes; ``config.width`` must equal the vision encoder's width.
        words: the words of its training questions (case-insensitive). A question holding others gets a
            warning naming them, once per question; empty: no check.
    """

    def __init__(self, config: TextQueryConfig | None = None, words: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config = config or TextQueryConfig()
        self.words = frozenset(w.lower() for w in words)
        self._warned: set[str] = set()  # questions already warned about
        self.tokenizer = CharTokenizer()
        self.embed = nn.Embedding(self.tokenizer.vocab_size, config.dim, padding_idx=self.tokenizer.pad_token_id)
        self.position = nn.Parameter(torch.randn(config.max_chars, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, 4 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.slots = nn.Parameter(torch.randn(config.num_queries, config.dim) * 0.02)
        self.read = nn.MultiheadAttention(config.dim, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.width)
        # Only training uses these: they turn the max cosine into a logit of "patch lies in an answer box".
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    @property
    def device(self) -> torch.device:
        return self.slots.device

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside :attr:`words`, in order, each once (none when ``words`` is empty)."""
        if not self.words:
            return []
        return list(dict.fromkeys(w for w in _WORD.findall(text) if w.lower() not in self.words))

    def _check(self, texts: list[str]) -> None:
        """An empty question is an error; one with words never seen in training is a warning."""
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise InvalidInputError(
                f"a text query must hold words; query {blank[0]} is empty or only whitespace "
                f"({texts[blank[0]]!r}). For relevance without a query, pass query=None"
            )
        for text in texts:
            unknown = self.unknown_words(text)
            if unknown and text not in self._warned:
                self._warned.add(text)
                logger.warning(
                    "text query %r: the text query encoder never saw the word%s %s; it knows only the "
                    "generated world's vocabulary (%s), so these words steer nothing",
                    text,
                    "s" * (len(unknown) > 1),
                    ", ".join(repr(w) for w in unknown),
                    " ".join(sorted(self.words)),
                )

    def _ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [
            self.tokenizer.encode(t.strip())[: self.config.max_chars] or [self.tokenizer.pad_token_id] for t in texts
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ids = ids.to(self.device)
        return ids, ids == self.tokenizer.pad_token_id  # (B, C), (B, C) True on padding

    def forward(self, texts: str | list[str] | tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Encode questions.

        Args:
            texts: one question or a list.

        Returns:
            query ``(B, L, D)`` float32 and mask ``(B, L)`` bool.

        Raises:
            InvalidInputError: an empty list, an empty or whitespace question, or a character outside the
                tokenizer's vocabulary.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InvalidInputError("texts must hold at least one question")
        self._check(texts)
        ids, pad = self._ids(texts)
        x = self.embed(ids) + self.position[: ids.shape[1]]  # (B, C, dim)
        x = self.encoder(x, src_key_padding_mask=pad)
        slots = self.slots.expand(len(texts), -1, -1)  # (B, L, dim)
        read, _ = self.read(slots, x, x, key_padding_mask=pad, need_weights=False)
        query = self.out(self.norm(slots + read)).float()  # (B, L, D)
        return query, torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)

    # --- weights ----------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike[str], dtype: torch.dtype = torch.float16) -> None:
        """Write ``text_query.safetensors`` (the config and the words in its metadata)."""
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone()  # ok-sync: saving
            for k, v in self.state_dict().items()
        }
        metadata = {"config": json.dumps(dataclasses.asdict(self.config)), "words": json.dumps(sorted(self.words))}
        save_file(state, Path(folder) / TEXT_QUERY_FILE, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], device: torch.device | str | None = None
    ) -> TextQueryEncoder:
        """Load ``text_query.safetensors`` from ``folder`` (float32, eval mode).

        Its words come from the file's metadata; a file saved before it held them takes them from the tokenizer of
        the VLM saved beside it (``vlm.json``), trained on the same generated world.

        Raises:
            MissingWeightsError: the folder holds no such file.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(folder) / TEXT_QUERY_FILE
        if not path.is_file():
            raise MissingWeightsError(f"{os.fspath(folder)!r} holds no {TEXT_QUERY_FILE}")
        with safe_open(os.fspath(path), "pt") as handle:
            metadata = handle.metadata() or {}
        meta: dict[str, Any] = json.loads(metadata.get("config", "{}"))
        words = json.loads(metadata["words"]) if "words" in metadata else _vlm_words(Path(folder))
        model = cls(TextQueryConfig(**meta), words=words)
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in load_file(os.fspath(path)).items()}
        )
        if device is not None:
            model.to(device)
        return model.eval()


def _vlm_words(folder: Path) -> list[str]:
    """The word vocabulary of the VLM tokenizer saved in ``folder`` (``vlm.json``), or none."""
    try:
        return list(json.loads((folder / "vlm.json").read_text())["tokenizer"].get("words", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def max_cosine(query: Tensor, mask: Tensor, features: Tensor) -> Tensor:
    """``(B, N)``: each patch's best cosine with a real query token (what the participatory scorer takes)."""
    cosine = torch.einsum("bnd,bld->bnl", F.normalize(features.float(), dim=-1), F.normalize(query.float(), dim=-1))
    return torch.where(mask[:, None, :], cosine, -2.0).amax(-1)


def relevance_loss(encoder: TextQueryEncoder, query: Tensor, mask: Tensor, features: Tensor, target: Tensor) -> Tensor:
    """Balanced binary cross-entropy of "this patch lies in an answer box", predicted from the max cosine.

    Args:
        query, mask: the encoder's output for the batch's questions.
        features: ``(B, N, D)`` patch features.
        target: ``(B, N)`` float in [0, 1], 1 inside the answer boxes.
    """
    logits = encoder.logit_scale * max_cosine(query, mask, features) + encoder.logit_bias  # (B, N)
    positives = target.sum().clamp_min(1.0)
    negatives = (1 - target).sum().clamp_min(1.0)
    weight = torch.where(target > 0.5, 0.5 / positives, 0.5 / negatives)  # each class half the loss
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def patch_targets(
    boxes: tuple[tuple[int, int, int, int], ...], size: int, patch: int = 16, cover: float = 0.2
) -> Tensor:
    """``(N,)`` float: 1 for the patches of a ``size x size`` image covered at least ``cover`` by a box."""
    pixels = torch.zeros(size, size)
    for x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = 1.0
    return (F.avg_pool2d(pixels[None, None], patch)[0, 0] >= cover).float().flatten()
