"""Cheap texture features on the patch grid: perceptual colour, edges, local contrast and flatness.

They need no learned weights, so the weight-free scorers can read real image structure before any training. On
CUDA they are two Triton kernels (``_texture_triton``), registered as the custom op ``arrcoc::texture_features``
so that ``torch.compile`` keeps it as one call; ``ARRCOC_TEXTURE_KERNEL=0`` in the environment (read once, at
import) or ``texture.USE_KERNEL = False`` before a pipeline first runs keeps the torch form there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError
from .kernels import kernel_enabled

__all__ = ["FLAT_RANGE", "TEXTURE_CHANNELS", "USE_KERNEL", "Texture", "patch_mean", "rgb_to_lab", "texture_features"]

#: Whether CUDA tensors go to the Triton kernel (else the torch form everywhere).
USE_KERNEL: bool = kernel_enabled("ARRCOC_TEXTURE_KERNEL")

#: Channels of :func:`texture_features`, in order.
TEXTURE_CHANNELS: tuple[str, ...] = ("L", "a", "b", "edge", "contrast", "flat")

#: A pixel is flat when the lightness of the image pixels in its 5 x 5 neighbourhood spans less than this (L*/100):
#: a constant fill such as a fundus photo's black mask or a scan's blank margin. A photographed surface's noise
#: spans more (skin and the generated world's backgrounds do; a clear, compressed sky may not, which is why
#: ``arrcoc.stages.balance.frame_patches`` also asks a fill to have no colour).
FLAT_RANGE = 0.006

# sRGB (D65) -> XYZ, and the D65 white point (IEC 61966-2-1, CIE 15).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)


def _xyz_matrix() -> Tensor:
    return torch.tensor(_RGB_TO_XYZ) / torch.tensor(_WHITE)[:, None]  # white-normalised rows


def _sobel() -> Tensor:
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    return torch.stack((sobel_x, sobel_x.t()))[:, None]  # (2, 1, 3, 3)


def rgb_to_lab(rgb: Tensor, matrix: Tensor | None = None) -> Tensor:
    """sRGB in [0, 1] -> CIE L*a*b*, scaled so L is in [0, 1] and a, b roughly in [-1, 1].

    Args:
        rgb: ``(B, 3, H, W)`` float.
        matrix: the white-normalised sRGB -> XYZ matrix on ``rgb``'s device (built when omitted; stages pass
            a buffer, since building it from Python numbers is a host-to-device copy).

    Returns:
        ``(B, 3, H, W)`` float: L/100, a/100, b/100.
    """
    matrix = _xyz_matrix().to(rgb.device) if matrix is None else matrix
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(0) ** 2.4)
    # a 3 x 3 colour matrix as broadcast products and one sum: as a matrix product (K = 3) cuBLAS runs a skinny
    # GEMM far below memory speed, the Qwen adapter's largest kernel after the vision tower
    xyz = (matrix[None, :, :, None, None] * linear[:, None]).sum(2)  # (B, 3, H, W)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    lab = torch.stack((1.16 * fy - 0.16, 5.0 * (fx - fy), 2.0 * (fy - fz)), dim=1)
    return lab


def texture_features(
    pixels: Tensor, valid: Tensor, grid: tuple[int, int], matrix: Tensor | None = None, sobel: Tensor | None = None
) -> Tensor:
    """Per-patch colour, edge strength, local contrast and flatness.

    Edges are measured with a Sobel filter on lightness; the border between the image and its letterbox
    padding is not an edge of the image, so responses within one pixel of the padding are dropped. Flatness is
    the share of a patch's image pixels that are flat (:data:`FLAT_RANGE`): what tells an artificial border
    (``arrcoc.stages.balance.frame_patches``) from the picture.

    Args:
        pixels: ``(B, 3, S, S)`` RGB in [0, 1].
        valid: ``(B, 1, S, S)`` 1 on image pixels, 0 on padding.
        grid: ``(gh, gw)`` patch grid; ``S`` must be divisible by both.
        matrix, sobel: constant tensors on the pixels' device (see :class:`Texture`, which holds them).

    Returns:
        ``(B, gh, gw, 6)`` float: mean L, a, b; mean Sobel magnitude; standard deviation of L; the flat share
        (see ``TEXTURE_CHANNELS``), over the valid pixels of each patch (0 for padding patches).

    Raises:
        InvalidInputError: the pixels' sides are not whole numbers of patches of ``grid``.
    """
    if pixels.shape[-2] % grid[0] or pixels.shape[-1] % grid[1]:  # the kernel would drop the remainder silently
        raise InvalidInputError(
            f"texture: pixels of {tuple(pixels.shape[-2:])} are not a whole number of patches of the {tuple(grid)} grid"
        )
    if USE_KERNEL and pixels.is_cuda:
        matrix = _xyz_matrix().to(pixels.device) if matrix is None else matrix
        return _cuda_call(pixels.detach(), valid.detach(), grid[0], grid[1], matrix)
    return texture_reference(pixels, valid, grid, matrix, sobel)


def texture_reference(
    pixels: Tensor, valid: Tensor, grid: tuple[int, int], matrix: Tensor | None = None, sobel: Tensor | None = None
) -> Tensor:
    """:func:`texture_features` in torch (the CPU's form, and what the kernel is tested against)."""
    gh, gw = grid
    patch = (pixels.shape[-2] // gh, pixels.shape[-1] // gw)
    lab = rgb_to_lab(pixels.float(), matrix)  # (B, 3, S, S)
    light = lab[:, :1]  # (B, 1, S, S)
    sobel = _sobel().to(pixels.device) if sobel is None else sobel
    gradient = F.conv2d(F.pad(light, (1, 1, 1, 1), mode="replicate"), sobel)  # (B, 2, S, S)
    edge = gradient.square().sum(1, keepdim=True).sqrt()  # (B, 1, S, S)
    interior = -F.max_pool2d(-valid, 3, stride=1, padding=1)  # valid eroded by one pixel
    edge = edge * interior

    # one pooling for every statistic: the valid share, then the valid-weighted L, a, b, edge and L squared
    pooled = patch_mean(torch.cat((valid, torch.cat((lab, edge, light.square()), 1) * valid), 1), patch)
    weight = pooled[:, :1]  # (B, 1, gh, gw): valid share of each patch
    denom = weight.clamp_min(1e-6)
    mean = pooled[:, 1:5] / denom  # (B, 4, gh, gw)
    light_sq = pooled[:, 5:] / denom
    contrast = (light_sq - mean[:, :1].square()).clamp_min(0).sqrt()  # (B, 1, gh, gw)
    flat = _flat_share(light, valid, patch)  # (B, 1, gh, gw)
    features = torch.cat((mean, contrast, flat), 1) * (weight > 0)  # (B, 6, gh, gw)
    return features.permute(0, 2, 3, 1).contiguous()


def _flat_step(patch: tuple[int, int]) -> int:
    """Flatness is read on every ``_flat_step(patch)``-th pixel: 2 where the patch sides are even (a 3 x 3 window of
    samples then spans the same 5 pixels), else 1. The torch form and the CUDA kernels both read it here."""
    return 2 if patch[0] % 2 == 0 and patch[1] % 2 == 0 else 1


def _flat_share(light: Tensor, valid: Tensor, patch: tuple[int, int]) -> Tensor:
    """``(B, 1, gh, gw)``: the share of each patch's image pixels whose 5 x 5 neighbourhood of image pixels spans
    less than :data:`FLAT_RANGE` in lightness. Read on every other pixel where the patch sides are even (a 3 x 3
    window of samples spans the same 5 pixels): a quarter of the work on the data-set path, for a count that needs
    no finer grain."""
    step = _flat_step(patch)
    light, image = light[..., ::step, ::step], valid[..., ::step, ::step] > 0
    size = 5 if step == 1 else 3
    # padding left out: below every maximum, above every minimum
    high = F.max_pool2d(light.masked_fill(~image, -1.0), size, stride=1, padding=size // 2)
    low = -F.max_pool2d((-light).masked_fill(~image, -2.0), size, stride=1, padding=size // 2)
    flat = (high - low < FLAT_RANGE) & image
    counts = patch_mean(torch.cat((image, flat), 1).to(light.dtype), (patch[0] // step, patch[1] // step))
    return counts[:, 1:] / counts[:, :1].clamp_min(1e-6)


def _kernel(pixels: Tensor, valid: Tensor, gh: int, gw: int, matrix: Tensor) -> Tensor:
    from . import _texture_triton  # Triton is imported on the first CUDA call only

    return _texture_triton.launch(pixels, valid, (gh, gw), matrix, FLAT_RANGE)


if hasattr(torch.library, "custom_op"):  # torch >= 2.4

    @torch.library.custom_op("arrcoc::texture_features", mutates_args=())
    def _texture_op(pixels: Tensor, valid: Tensor, gh: int, gw: int, matrix: Tensor) -> Tensor:
        return texture_reference(pixels, valid, (gh, gw), matrix)

    @_texture_op.register_fake
    def _(pixels: Tensor, valid: Tensor, gh: int, gw: int, matrix: Tensor) -> Tensor:
        return pixels.new_empty(pixels.shape[0], gh, gw, len(TEXTURE_CHANNELS), dtype=torch.float32)

    @_texture_op.register_kernel("cuda")
    def _(pixels: Tensor, valid: Tensor, gh: int, gw: int, matrix: Tensor) -> Tensor:
        return _kernel(pixels, valid, gh, gw, matrix)

    _cuda_call = _texture_op
else:  # older torch: the kernel runs eagerly and graphs capture it; torch.compile breaks the graph around it
    _cuda_call = _kernel


def patch_mean(values: Tensor, patch: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, H / ph, W / pw)``: the mean of each patch.

    ``avg_pool2d(values, patch)`` in value, as one reduction over a view: pooling with a 16x16 window loops
    over 256 reads per output in one GPU thread, which was slow (docs/decisions.md).
    """
    b, c, h, w = values.shape
    ph, pw = patch
    return values.view(b, c, h // ph, ph, w // pw, pw).mean((3, 5))


class Texture(nn.Module):
    """Module form of :func:`texture_features`, holding its constants as buffers (no host copies in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("matrix", _xyz_matrix(), persistent=False)
        self.register_buffer("sobel", _sobel(), persistent=False)

    def forward(self, pixels: Tensor, valid: Tensor, grid: tuple[int, int]) -> Tensor:
        """See :func:`texture_features`."""
        return texture_features(pixels, valid, grid, self.matrix, self.sobel)
