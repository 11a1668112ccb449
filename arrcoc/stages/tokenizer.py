"""A character tokenizer for the small VLM: one id per character (and per listed word), four special tokens,
left padding.

The generated world's questions and answers use a few dozen characters, so a character vocabulary keeps the
language model's embedding table tiny and needs no trained merges or files. Optional whole words (the
world's question and answer words, :data:`arrcoc.world.data.WORDS`) get one id each, as a subword tokenizer would
give them: a character model must first assemble "purple" from six ids inside its few layers before it
can look for purple in the image.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["CharTokenizer", "IMAGE_PLACEHOLDER", "DEFAULT_TEMPLATE"]

#: Stands for the image in prompt text; ``expand`` turns it into as many image tokens as there are visual tokens.
IMAGE_PLACEHOLDER = "<image>"

#: The prompt: the question first, so that every visual token can attend to it inside the language model.
DEFAULT_TEMPLATE = "Q: {question}\n" + IMAGE_PLACEHOLDER + "\nA: "

_SPECIALS = ("<pad>", "<s>", "</s>", IMAGE_PLACEHOLDER)
_CHARACTERS = " " + string.ascii_lowercase + string.ascii_uppercase + string.digits + "?.,:;'!-\n"
_LETTER_RUN = re.compile(r"[A-Za-z]+")


class CharTokenizer:
    """Characters (and whole words) <-> ids, with ``<pad>``, ``<s>``, ``</s>`` and ``<image>``.

    Args:
        characters: one id each; every text must be spelled from them.
        template: the prompt, holding ``{question}`` and one ``<image>``.
        words: letter-only words that get one id each when a whole run of letters in the text equals one
            (``"purple"`` in ``"purple shapes"``, not in ``"purples"``); the rest is spelled by character.

    Attributes:
        pad_token_id, bos_token_id, eos_token_id, image_token_id: the special ids.
        vocab_size: number of ids.
    """

    def __init__(
        self, characters: str = _CHARACTERS, template: str = DEFAULT_TEMPLATE, words: Sequence[str] = ()
    ) -> None:
        if len(set(characters)) != len(characters):
            raise InvalidInputError("tokenizer characters must be distinct")
        if "{question}" not in template or template.count(IMAGE_PLACEHOLDER) != 1:
            raise InvalidInputError(f"template must hold '{{question}}' and one {IMAGE_PLACEHOLDER}; got {template!r}")
        words = list(dict.fromkeys(words))
        bad = [w for w in words if not _LETTER_RUN.fullmatch(w) or len(w) < 2 or set(w) - set(characters)]
        if bad:
            raise InvalidInputError(
                f"tokenizer words must be runs of 2+ letters spelled from its characters; got {bad}"
            )
        self.characters, self.template, self.words = characters, template, tuple(words)
        self.vocab = list(_SPECIALS) + list(characters) + words
        self._ids = {c: i + len(_SPECIALS) for i, c in enumerate(characters)}
        self._word_ids = {w: i + len(_SPECIALS) + len(characters) for i, w in enumerate(words)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.image_token_id = range(len(_SPECIALS))
        self.vocab_size = len(self.vocab)

    # --- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of ``text``; each ``<image>`` becomes one image token id.

        Raises:
            InvalidInputError: a character outside the vocabulary.
        """
        ids = [self.bos_token_id] if add_bos else []
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(self.image_token_id)
            try:
                ids.extend(self._encode_part(part))
            except KeyError as err:
                raise InvalidInputError(
                    f"character {err.args[0]!r} is not in the tokenizer's vocabulary ({self.characters!r})"
                ) from None
        return ids

    def _encode_part(self, text: str) -> list[int]:
        if not self._word_ids:
            return [self._ids[c] for c in text]
        ids, at = [], 0
        for run in _LETTER_RUN.finditer(text):
            ids += [self._ids[c] for c in text[at : run.start()]]
            word = self._word_ids.get(run.group())
            ids += [word] if word is not None else [self._ids[c] for c in run.group()]
            at = run.end()
        return ids + [self._ids[c] for c in text[at:]]

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; stops at the first ``</s>``. Special tokens are dropped unless asked for."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()  # ok-sync: decoding to text
        out = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i < len(_SPECIALS):
                if not skip_special_tokens:
                    out.append(self.vocab[i])
                continue
            out.append(self.vocab[i])
        return "".join(out)

    # --- prompts ----------------------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """The model's prompt for ``question`` (its template: the question, one image placeholder, the answer cue)."""
        return self.template.replace("{question}", question.strip())

    def expand(self, text: str, image_tokens: int) -> str:
        """``text`` with each image placeholder repeated ``image_tokens`` times (one per visual token)."""
        if image_tokens < 0:
            raise InvalidInputError(f"image_tokens must be >= 0; got {image_tokens}")
        return text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * image_tokens)

    def __call__(
        self,
        texts: str | Sequence[str],
        image_tokens: int | Sequence[int] = 1,
        targets: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Tensor]:
        """Encode a batch of prompts, left padded, each image placeholder expanded to ``image_tokens`` ids.

        Args:
            texts: prompts (e.g. from :meth:`prompt`); each gets ``<s>`` in front.
            image_tokens: visual tokens per image: one number, or one per prompt.
            targets: answers to append (each followed by ``</s>``), for training; then ``labels`` holds their ids
                and -100 elsewhere.
            device: where the tensors go.

        Returns:
            ``input_ids`` and ``attention_mask`` ``(B, L)`` (0 on padding), ``position_ids`` ``(B, L)`` counting
            from the first real token, and ``labels`` when targets are given.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        counts = [image_tokens] * len(texts) if isinstance(image_tokens, int) else list(image_tokens)
        if len(counts) != len(texts) or (targets is not None and len(targets) != len(texts)):
            raise InvalidInputError("texts, image_tokens and targets must have the same length")
        rows, label_rows = [], []
        for i, (text, count) in enumerate(zip(texts, counts)):
            ids = self.encode(self.expand(text, count), add_bos=True)
            labels = [-100] * len(ids)
            if targets is not None:
                answer = self.encode(targets[i]) + [self.eos_token_id]
                ids, labels = ids + answer, labels + answer
            rows.append(ids)
            label_rows.append(labels)
        length = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, label_rows)):
            if ids:
                input_ids[i, -len(ids) :] = torch.tensor(ids)
                attention[i, -len(ids) :] = 1
                labels[i, -len(ids) :] = torch.tensor(lab)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        out = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids}
        if targets is not None:
            out["labels"] = labels
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    # --- serialisation ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "characters": self.characters,
                "specials": list(_SPECIALS),
                "template": self.template,
                "words": list(self.words),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        data: dict[str, Any] = json.loads(text)
        if tuple(data.get("specials", _SPECIALS)) != _SPECIALS:
            raise InvalidInputError(f"tokenizer specials {data.get('specials')} differ from {_SPECIALS}")
        return cls(data["characters"], data.get("template", DEFAULT_TEMPLATE), data.get("words", ()))
