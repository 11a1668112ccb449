"""The texture's Triton kernels (``arrcoc.stages._texture_triton``): the torch form's six values per patch, each
image's independent of the batch around it, on every patch shape the pipeline builds.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported), on small images; the ``cuda`` tests run the compiled kernel through the pipeline's ``Texture`` stage on
the generated world's scenes and on a photograph with a black mask.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from arrcoc.errors import InvalidInputError
from arrcoc.stages import texture
from arrcoc.stages.texture import Texture, patch_mean, texture_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
#: (side, grid): 32-px patches (flatness on every other pixel), 21-px (odd: on every pixel), 32 x 16 (not square);
#: few patches, since the interpreter runs each program in Python
CASES = [(64, (2, 2)), (42, (2, 2)), (32, (1, 2))]
#: values a float32 sum in another order can move by: far below anything a scorer reads
TOLERANCE = 2e-5
#: the contrast is sqrt(E[L^2] - E[L]^2) in both forms: on a flat patch the difference is a float32 rounding of
#: E[L^2] (up to about 1e-7 for L near 1), whose square root is up to 3.5e-4, whichever order the sums ran in
CONTRAST_TOLERANCE = 1e-3
#: the flat share is a ratio of counts: the same counts differ by the division's rounding (1.2e-7 on the H200); one
#: sample more or less moves it by 1/64 or more
FLAT_TOLERANCE = 1e-6


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference beyond each channel's tolerance (0: within every tolerance)."""
    over = (got - want).abs() - torch.tensor([TOLERANCE] * 4 + [CONTRAST_TOLERANCE, FLAT_TOLERANCE])
    return max(over.max().item(), 0.0)


def _scene(side: int, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, flat fills (a black frame, a grey block) and letterbox padding: every branch of the texture."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, side, side, generator=generator)
    pixels[0, :, : side // 4] = 0.0  # a black band: flat
    pixels[1, :, side // 3 : side // 2, side // 4 : side // 2] = 0.5  # a grey block: flat, with a rim
    pixels[2] = pixels[2] * 0.2 + torch.linspace(0, 0.8, side)  # a ramp under noise: edges
    valid = torch.ones(batch, 1, side, side)
    valid[1, :, :, side // 2 :] = 0.0  # letterboxed at the right: whole patches of padding
    valid[2, :, side - 5 :] = 0.0  # at the bottom, not on a patch boundary
    pixels = pixels * valid + 0.5 * (1 - valid)  # the pad value beyond the content, as the Preprocessor writes
    return pixels, valid


def _interpret_all() -> dict[str, object]:
    """Every check through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _texture_triton

    matrix = texture._xyz_matrix()
    out: dict[str, object] = {}
    for side, grid in CASES:
        pixels, valid = _scene(side)
        want = texture_reference(pixels, valid, grid)
        got = _texture_triton.launch(pixels, valid, grid, matrix, texture.FLAT_RANGE)
        key = f"{side}-{grid[0]}x{grid[1]}"
        out[f"error-{key}"] = _close(got, want)
        padding = patch_mean(valid, (side // grid[0], side // grid[1]))[:, 0] == 0  # (B, gh, gw)
        out[f"padding-{key}"] = bool(padding.any()) and bool((got[padding] == 0).all())
        out[f"alone-{key}"] = all(
            torch.equal(_texture_triton.launch(pixels[i : i + 1], valid[i : i + 1], grid, matrix, 0.006)[0], got[i])
            for i in range(pixels.shape[0])
        )
        # a channels-last bfloat16 batch: read through its strides, converted where it is read
        strided = pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out[f"strided-{key}"] = _close(
            _texture_triton.launch(strided, valid, grid, matrix, 0.006), texture_reference(strided.float(), valid, grid)
        )
    return out


@pytest.mark.parametrize("side, grid", CASES)
def test_interpreted_kernel_gives_the_torch_forms_values(
    interpreted: dict[str, object], side: int, grid: tuple[int, int]
) -> None:
    key = f"{side}-{grid[0]}x{grid[1]}"
    assert interpreted[f"error-{key}"] == 0 and interpreted[f"strided-{key}"] == 0, interpreted


@pytest.mark.parametrize("side, grid", CASES)
def test_interpreted_kernel_leaves_padding_patches_at_zero_and_each_image_as_alone(
    interpreted: dict[str, object], side: int, grid: tuple[int, int]
) -> None:
    key = f"{side}-{grid[0]}x{grid[1]}"
    assert interpreted[f"padding-{key}"] and interpreted[f"alone-{key}"], interpreted


def test_the_texture_reads_the_torch_form_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pixels, valid = _scene(64)
    want = texture_reference(pixels, valid, (4, 4))
    monkeypatch.setattr(texture, "_cuda_call", None)  # never reached off CUDA
    assert torch.equal(Texture()(pixels, valid, (4, 4)), want)


def test_a_grid_that_does_not_divide_the_pixels_is_refused() -> None:
    pixels, valid = _scene(30)
    with pytest.raises(InvalidInputError, match=r"\(30, 30\) are not a whole number of patches of the \(4, 4\)"):
        texture.texture_features(pixels, valid, (4, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_kernel_on_the_gpu_gives_the_torch_forms_values() -> None:
    import numpy as np

    from arrcoc.world.data import make_sample

    assert texture.USE_KERNEL
    stage = Texture().cuda()
    scenes = [torch.from_numpy(np.asarray(make_sample(seed, 224).image).copy()) for seed in range(6)]
    pixels = torch.stack(scenes).permute(0, 3, 1, 2).float() / 255
    # a fundus-like photo: noise inside a disc, a black mask around it, the right side letterboxed
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    disc = ((yy - 112) ** 2 + (xx - 100) ** 2 < 95**2).float()
    pixels[0] = (0.4 + 0.2 * torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))) * disc
    valid = torch.ones(pixels.shape[0], 1, 224, 224)
    valid[0, :, :, 200:] = 0
    pixels = pixels * valid + 0.5 * (1 - valid)
    for grid in ((14, 14), (7, 7), (32, 32)):  # 16-px patches, 32-px, 7-px (flatness on every pixel)
        got = stage(pixels.cuda(), valid.cuda(), grid).cpu()
        want = texture_reference(pixels, valid, grid)
        assert _close(got, want) == 0, (got - want).abs().amax((0, 1, 2))  # flatness too: it decides the border tier


if __name__ == "__main__":  # the interpreter run behind `interpreted`: prints one JSON line
    print(json.dumps(_interpret_all()))
