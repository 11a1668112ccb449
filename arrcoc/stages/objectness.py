"""A learned objectness probe: ``sigmoid(features @ weight + bias)`` per patch, for the object-first pick.

The probe is a logistic regression on one encoder's patch features (trained by :mod:`arrcoc.world.objectness`), so it
means something only on the features of the encoder it was trained on. Its file (``objectness.safetensors``) names
that encoder in its metadata by width and by :func:`encoder_fingerprint`, and :meth:`Objectness.check` refuses any
other encoder: a mismatched probe would silently pick noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DEFAULT_WEIGHTS_DIR
from ..errors import InvalidInputError, MissingWeightsError

__all__ = ["OBJECTNESS_FILE", "Objectness", "encoder_fingerprint"]

#: The probe's file name beside ``encoder.safetensors``.
OBJECTNESS_FILE = "objectness.safetensors"


def encoder_fingerprint(state: Mapping[str, Tensor]) -> str:
    """A hex SHA-256 of an encoder's weights: names, shapes and values rounded to float16.

    Float16 rounding makes a float32 copy of the shipped float16 file (``Pipeline.save_pretrained``) read the same,
    while any training step moves it.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float16).contiguous()  # ok-sync: hashing weights at load time
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


class Objectness(nn.Module):
    """Stage: patch features ``(B, gh, gw, D)`` -> objectness ``(B, gh, gw)`` in (0, 1), 0 on padding.

    Args:
        weight: ``(D,)`` the probe's weights.
        bias: ``()`` its bias.
        encoder: the fingerprint (:func:`encoder_fingerprint`) of the encoder whose features it was trained on.
        metadata: what else its file says (training seeds, held-out fit); kept as strings.
    """

    def __init__(self, weight: Tensor, bias: Tensor, encoder: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if weight.dim() != 1 or bias.dim() != 0:
            raise InvalidInputError(
                f"an objectness probe is a (D,) weight and a scalar bias; got {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.encoder = encoder
        self.metadata = dict(metadata or {})

    @property
    def width(self) -> int:
        """``D``: the feature width it reads."""
        return self.weight.shape[0]

    def forward(self, features: Tensor, patch_valid: Tensor) -> Tensor:
        """``(B, gh, gw)`` the probe's probability that each patch is an object's best patch; 0 on padding."""
        logit = features.float() @ self.weight + self.bias  # (B, gh, gw)
        return torch.where(patch_valid > 0, torch.sigmoid(logit), 0.0)

    def check(self, width: int, encoder: str | None, what: str = "this encoder") -> None:
        """Refuse features it was not trained on.

        Args:
            width: the encoder's feature width ``D``.
            encoder: its :func:`encoder_fingerprint`; ``None`` where it has no trained weights.
            what: how the message names the encoder.

        Raises:
            MissingWeightsError: another width, untrained weights, or another encoder's weights.
        """
        why = None
        if width != self.width:
            why = f"its features are {width} wide, the probe reads {self.width}"
        elif encoder is None:
            why = "it has no trained weights (a random initialisation)"
        elif encoder != self.encoder:
            why = f"its weights (fingerprint {encoder[:12]}) are not the probe's encoder ({self.encoder[:12]})"
        if why is not None:
            raise MissingWeightsError(
                f"balance.pick='peaks' needs an objectness probe trained on {what}'s features, and {why}; train one "
                "with `python -m arrcoc.world.objectness` or choose another pick"
            )

    def save(self, path: str | os.PathLike[str], **metadata: Any) -> None:
        """Write the probe and its metadata (``metadata`` values as JSON where not strings) to a safetensors file."""
        from safetensors.torch import save_file

        meta = {**self.metadata, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
        meta.update(encoder=self.encoder, width=str(self.width))
        tensors = {"weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu()}  # ok-sync: saving
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Objectness:
        """Read a probe written by :meth:`save`.

        Raises:
            MissingWeightsError: no such file.
            InvalidInputError: the file is not a probe, or its metadata disagrees with its tensors.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(
                f"no objectness probe at {os.fspath(path)!r}: balance.pick='peaks' needs one trained on the "
                "encoder's features (`python -m arrcoc.world.objectness`)"
            )
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if names != {"weight", "bias"} or "encoder" not in meta or "width" not in meta:
                raise InvalidInputError(
                    f"{os.fspath(path)!r} is not an objectness probe: tensors {sorted(names)}, metadata {sorted(meta)}"
                )
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        if str(weight.shape[0]) != meta["width"]:
            raise InvalidInputError(
                f"{os.fspath(path)!r}: the metadata says width {meta['width']}, the weight is {tuple(weight.shape)}"
            )
        return cls(weight, bias, meta["encoder"], meta)

    @classmethod
    def for_encoder(
        cls,
        folder: str | os.PathLike[str] | None,
        width: int,
        encoder: str | None,
        what: str = "this encoder",
    ) -> Objectness:
        """The probe in ``folder`` (default: the shipped weights), checked against the encoder (:meth:`check`)."""
        probe = cls.load(Path(folder if folder is not None else DEFAULT_WEIGHTS_DIR) / OBJECTNESS_FILE)
        probe.check(width, encoder, what)
        return probe
