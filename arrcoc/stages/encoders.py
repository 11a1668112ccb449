"""Visual encoding: a timm backbone turned into a patch grid, plus texture features on the same grid.

One backbone (one set of weights) serves every bucket size. For ViTs each bucket gets its own model
instance built with that bucket's ``img_size``, whose parameters are the backbone's own tensors (shared, not
copied) except the absolute position embedding, resampled once. So the encode stage of a bucket has static
shapes and does no interpolation at run time.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ..errors import EncoderError, InvalidInputError, MissingWeightsError
from .texture import Texture, patch_mean

__all__ = [
    "ENCODER_DTYPES",
    "Encoder",
    "PatchProjection",
    "create_backbone",
    "load_safetensors",
    "encoder_for_bucket",
    "patch_stride",
]

logger = logging.getLogger(__name__)

ENCODER_DTYPES: Final = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _create(name: str, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    extra = {} if img_size is None else {"img_size": img_size}
    if not timm.is_model(name):
        raise EncoderError(f"encoder {name!r} is not a timm model name (see timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=0, **extra, **kwargs)


def _takes_img_size(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether the architecture is built for one input size (ViTs) or runs at any size (ConvNets)."""
    try:
        with torch.device("meta"):
            _create(name, 224, kwargs)
    except TypeError as err:  # the model's constructor has no img_size argument
        if "img_size" in str(err):
            return False
        raise
    return True


def load_safetensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local safetensors file into ``model`` (strict), with errors that say what does not match."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise MissingWeightsError(f"encoder weights file {os.fspath(path)!r} does not exist")
    try:
        state = load_file(os.fspath(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise InvalidInputError(
            f"encoder weights file {os.fspath(path)!r} is not a readable safetensors file: {err}"
        ) from err
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InvalidInputError(
            f"encoder weights {os.fspath(path)!r} do not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def create_backbone(
    name: str, *, weights: str | os.PathLike[str] | None = None, seed: int = 0, **kwargs: Any
) -> nn.Module:
    """The timm backbone at its native size, in eval mode.

    Args:
        name: timm model name.
        weights: a local safetensors file; without one the weights are a deterministic random
            initialisation from ``seed`` (the global RNG is left untouched).
        seed: initialisation seed.
        **kwargs: passed to ``timm.create_model``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(name, None, kwargs)
    if weights is not None:
        load_safetensors(model, weights)
    model.requires_grad_(False)
    return model.eval()


def _bucket_model(backbone: nn.Module, name: str, bucket: int, kwargs: dict[str, Any]) -> nn.Module:
    """A model for ``bucket`` sharing the backbone's tensors (the position embedding resampled)."""
    base_grid = tuple(backbone.patch_embed.grid_size) if hasattr(backbone, "patch_embed") else None
    with torch.random.fork_rng(devices=[]):
        model = _create(name, bucket, kwargs)
    if hasattr(model, "patch_embed") and tuple(model.patch_embed.grid_size) == base_grid:
        return backbone
    own = model.state_dict()
    state = {}
    for key, tensor in backbone.state_dict().items():
        if key in own and own[key].shape != tensor.shape:
            if not key.endswith("pos_embed"):
                raise EncoderError(
                    f"encoder {name!r}: parameter {key!r} changes shape with the input size "
                    f"({tuple(tensor.shape)} -> {tuple(own[key].shape)}); it cannot serve bucket {bucket}"
                )
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            tensor = resample_abs_pos_embed(
                tensor, list(model.patch_embed.grid_size), list(base_grid), num_prefix_tokens=prefix
            )
        state[key] = tensor
    # frozen first: the backbone's tensors are inference tensors once a bf16 pipeline has run (converted under
    # inference mode), and assigning them to parameters that require grad fails outside inference mode
    model.requires_grad_(False)
    model.load_state_dict(state, assign=True)  # assign: share the backbone's storage, no copy
    return model.eval().to(next(backbone.parameters()).device)


class PatchProjection(nn.Module):
    """A ViT's patch embedding (a ``Conv2d`` whose kernel is its stride) as one matmul over the patches.

    It holds the convolution's own parameters under the same names, so state dicts do not change. cuDNN runs
    this convolution as a slow implicit GEMM; a copy of the pixels into patch rows and one linear layer give the
    same numbers up to rounding, faster (docs/decisions.md).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameter objects: shared, moved together
        self.kernel_size = tuple(conv.kernel_size)

    @staticmethod
    def fits(module: nn.Module) -> bool:
        """Whether ``module`` is a plain convolution over non-overlapping patches."""
        return (
            type(module) is nn.Conv2d
            and tuple(module.kernel_size) == tuple(module.stride)
            and tuple(module.padding) == (0, 0)
            and tuple(module.dilation) == (1, 1)
            and module.groups == 1
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, D, H / ph, W / pw)``, as the convolution returns (a channels-last view)."""
        b, c, h, w = x.shape
        ph, pw = self.kernel_size
        rows = x.view(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, h // ph, w // pw, -1)
        return F.linear(rows, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """Stage: pixels of one bucket -> patch features, prefix tokens, texture and patch validity.

    Attributes:
        grid: ``(gh, gw)`` patch grid of this bucket.
        num_prefix_tokens: class/register tokens split off the front of a ViT's output.
    """

    grid: Final[tuple[int, int]]
    num_prefix_tokens: Final[int]
    token_output: Final[bool]

    def __init__(self, model: nn.Module, bucket: int, probe: torch.Size, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.bucket = bucket
        self.dtype = dtype
        self.texture = Texture()
        embed = getattr(model, "patch_embed", None)
        if embed is not None and PatchProjection.fits(getattr(embed, "proj", None)):
            embed.proj = PatchProjection(embed.proj)
        data = timm.data.resolve_model_data_config(model)
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1), persistent=False)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        # The output layout is decided once, from `probe`: the shape of forward_features on one image.
        if len(probe) == 3 and hasattr(model, "patch_embed"):
            self.token_output = True
            self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
            if probe[1] != self.num_prefix_tokens + self.grid[0] * self.grid[1]:
                raise EncoderError(
                    f"encoder {type(model).__name__}: {probe[1]} tokens do not form a "
                    f"{self.grid} grid plus {self.num_prefix_tokens} prefix tokens"
                )
        elif len(probe) == 4:
            self.token_output = False
            self.grid = (int(probe[2]), int(probe[3]))
        else:
            raise EncoderError(
                f"encoder {type(model).__name__} yields features of shape {tuple(probe)}, "
                "not a spatial grid (B, C, h, w) or patch tokens (B, N, D)"
            )
        if bucket % self.grid[0] or bucket % self.grid[1]:
            raise EncoderError(f"bucket {bucket} is not a whole number of patches of the {self.grid} grid")
        self.width = int(probe[-1] if self.token_output else probe[1])

    def forward(self, pixels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode one bucket: :meth:`features` then :meth:`layout` (the pipeline runs the two side by side).

        Args:
            pixels: ``(B, 3, S, S)`` RGB in [0, 1].
            valid: ``(B, 1, S, S)`` 1 on image pixels, 0 on padding.

        Returns:
            features ``(B, gh, gw, D)`` float32, prefix ``(B, P, D)`` float32 (P may be 0), texture
            ``(B, gh, gw, 6)`` and patch validity ``(B, gh, gw)``: the share of each patch's pixels that are image.
        """
        return *self.features(pixels), *self.layout(pixels, valid)

    def features(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone's patch features ``(B, gh, gw, D)`` and prefix tokens ``(B, P, D)``, float32."""
        b = pixels.shape[0]
        gh, gw = self.grid
        x = ((pixels - self.mean) / self.std).to(self.dtype)
        out = self.model.forward_features(x)
        if self.token_output:
            prefix = out[:, : self.num_prefix_tokens]  # (B, P, D)
            features = out[:, self.num_prefix_tokens :].reshape(b, gh, gw, -1)  # (B, gh, gw, D)
        else:
            features = out.permute(0, 2, 3, 1)  # (B, gh, gw, C)
            prefix = features.new_zeros(b, 0, features.shape[-1])
        return features.float().contiguous(), prefix.float()

    def layout(self, pixels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """What needs no backbone: texture ``(B, gh, gw, 6)`` and patch validity ``(B, gh, gw)``."""
        gh, gw = self.grid
        texture = self.texture(pixels, valid, self.grid)  # (B, gh, gw, 6)
        patch = (pixels.shape[-2] // gh, pixels.shape[-1] // gw)
        return texture, patch_mean(valid, patch)[:, 0]


def encoder_for_bucket(
    backbone: nn.Module, name: str, bucket: int, kwargs: dict[str, Any], dtype: str = "float32"
) -> Encoder:
    """Build the encode stage for one bucket size from a backbone (weights shared)."""
    sized = _takes_img_size(name, kwargs)
    with torch.device("meta"):  # a shape-only dry run: no memory, no compute
        probe = _create(name, bucket if sized else None, kwargs).forward_features(torch.empty(1, 3, bucket, bucket))
    model = _bucket_model(backbone, name, bucket, kwargs) if sized else backbone
    return Encoder(model, bucket, probe.shape, ENCODER_DTYPES[dtype])


def patch_stride(backbone: nn.Module) -> int:
    """Input pixels per patch of the backbone's output grid (the ViT patch size or the ConvNet reduction)."""
    if hasattr(backbone, "patch_embed"):
        size = backbone.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    info = getattr(backbone, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return int(last["reduction"])
    raise EncoderError(
        f"cannot tell the patch stride of {type(backbone).__name__}: it has no patch_embed or feature_info"
    )
