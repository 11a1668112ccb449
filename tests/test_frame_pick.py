"""An artificial border keeps no token while the picture has room: texture's flatness, ``frame_patches``, the
query-free pick with ``BalanceConfig.pick_frame``, and the generated world, which has no border and picks the same."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from arrcoc import InvalidTypeError, Pipeline
from arrcoc.config import BalanceConfig
from arrcoc.stages.balance import frame_patches
from arrcoc.stages.texture import TEXTURE_CHANNELS, patch_mean, texture_features
from arrcoc.tools.gallery import kept_patches
from arrcoc.world.data import make_sample

FLAT = TEXTURE_CHANNELS.index("flat")


def _fundus(size: int = 224, radius: float = 0.46, seed: int = 0) -> torch.Tensor:
    """``(3, S, S)``: a photographed disc (a reddish gradient, sensor noise, dark vessel-like strokes) on a black
    mask, the way a fundus camera frames its picture."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, size), torch.linspace(-0.5, 0.5, size), indexing="ij")
    disc = (x.square() + y.square()).sqrt() < radius
    picture = torch.stack((0.55 + 0.3 * x, 0.25 + 0.1 * y, 0.1 + 0.0 * x))  # (3, S, S)
    for _ in range(6):  # vessels
        a, b, c = (torch.rand(3, generator=g) - 0.5).tolist()
        picture = picture - 0.2 * ((a * x + b * y + 0.3 * c).abs() < 0.01).float()
    picture = picture + torch.randn(3, size, size, generator=g) * 5 / 255
    return (picture * disc).clamp(0, 1)


def _patches(image: torch.Tensor, patch: int = 16, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatness ``(1, gh, gw)`` and patch validity of ``image`` with ``pad`` columns of letterbox padding."""
    pixels = torch.nn.functional.pad(image, (0, pad))[None]
    valid = torch.ones(1, 1, *pixels.shape[-2:])
    valid[..., pixels.shape[-1] - pad :] = 0
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    texture = texture_features(pixels, valid, grid)
    return texture[..., FLAT], patch_mean(valid, (patch, patch))[:, 0]


def test_flatness_is_a_constant_fill_not_a_photographed_surface() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.full((3, 64, 96), 0.5)
    image[:, :, 32:64] += torch.randn(3, 64, 32, generator=g) * 20 / 255  # texture
    image[:, :, 64:] += torch.randn(3, 64, 32, generator=g) * 2 / 255  # two grey levels of sensor noise
    flat, valid = _patches(image, pad=32)
    assert flat.shape == (1, 4, 8)
    assert (flat[0, :, 0] == 1).all()  # constant grey: flat
    assert (flat[0, :, 1] == 7 / 8).all()  # the 5-pixel window of its last pixels reaches the texture
    assert (flat[0, :, 2:4] == 0).all()
    assert (flat[0, :, 4:6] < 0.15).all()  # faint noise is no constant fill either
    assert (flat[0, :, 6:] == 0).all() and (valid[0, :, 6:] == 0).all()  # padding patches: 0


def test_a_black_mask_and_its_rim_are_the_border_and_the_picture_is_not() -> None:
    flat, valid = _patches(_fundus())
    frame = frame_patches(flat, valid)[0]
    corner_fill = flat[0] >= 0.9
    assert corner_fill[0, 0] and frame[0, 0]  # the mask's corner
    assert frame[corner_fill].all()  # every solid patch of the mask reaches the edge here
    y, x = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    inner = ((y - 6.5).square() + (x - 6.5).square()).sqrt() < 4.5  # well inside the disc
    assert not frame[inner].any()
    rim = ~corner_fill & torch.nn.functional.max_pool2d(corner_fill[None].float(), 3, 1, 1)[0].bool()
    assert frame[rim].all()  # where the mask meets the picture


def test_a_flat_object_off_the_edge_is_no_border_nor_is_padding() -> None:
    g = torch.Generator().manual_seed(1)
    image = 0.5 + torch.randn(3, 128, 128, generator=g) * 6 / 255
    image[:, 40:90, 40:90] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a flat red square in the middle
    flat, valid = _patches(image, pad=32)  # letterboxed: padding on the right
    assert (flat[0, 3:5, 3:5] == 1).all()  # the square is flat
    assert not frame_patches(flat, valid).any()
    # the same square reaching the image's edge is a border (a pasted-on frame), padding never is
    image[:, 40:90, 40:] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    flat, valid = _patches(image, pad=32)
    frame = frame_patches(flat, valid)[0]
    assert frame[2:6, 2:8].all()  # the fill from the edge in, and its rim
    assert not frame[:, :2].any() and not frame[:, 8:].any()


def test_a_silhouette_on_a_flat_ground_is_a_drawing_not_a_framed_picture() -> None:
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, 224), torch.linspace(-0.5, 0.5, 224), indexing="ij")
    disc = (x.square() + y.square()).sqrt() < 0.3
    drawing = torch.where(disc, 0.0, 0.4).expand(3, -1, -1)  # a black disc on a flat grey ground
    flat, valid = _patches(drawing)
    assert (flat[0, 0] == 1).all() and flat[0, 7, 7] == 1  # both the ground and the disc's inside are flat
    assert not frame_patches(flat, valid).any()  # its outline is the content: no border
    framed = torch.where(disc, _fundus(radius=1.0), drawing)  # the same disc holding a photographed picture
    flat, valid = _patches(framed)
    frame = frame_patches(flat, valid)[0]
    assert frame[0].all() and not frame[7, 7]


def test_a_coloured_fill_is_sky_not_a_border() -> None:
    picture = _fundus(radius=1.0)
    blue, black = torch.tensor([0.3, 0.5, 0.9]), torch.zeros(3)
    for fill, bordered in ((blue, False), (black, True)):
        image = picture.clone()
        image[:, :64] = fill[:, None, None]  # a flat band across the top
        pixels, valid = image[None], torch.ones(1, 1, 224, 224)
        texture = texture_features(pixels, valid, (14, 14))
        patch_valid = torch.ones(1, 14, 14)
        frame = frame_patches(texture[..., FLAT], patch_valid, texture[..., :3])[0]
        assert bool(frame[0].all()) is bordered and not frame[8:].any()
        assert frame_patches(texture[..., FLAT], patch_valid)[0, 0].all()  # without colour, any flat fill


def test_frame_patches_traces_as_one_graph() -> None:
    flat, valid = _patches(_fundus())
    compiled = torch.compile(frame_patches, fullgraph=True, backend="eager")
    assert torch.equal(compiled(flat, valid), frame_patches(flat, valid))


def test_pick_frame_must_be_a_bool() -> None:
    with pytest.raises(InvalidTypeError, match="pick_frame"):
        BalanceConfig(pick_frame=1)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipes() -> tuple[Pipeline, Pipeline]:
    """The shipped pipeline, and the same without the border tier."""
    on = Pipeline.from_pretrained()
    return on, Pipeline.from_pretrained(balance=dataclasses.replace(on.config.balance, pick_frame=False))


def _kept_on(pipe: Pipeline, image: torch.Tensor, budget: int, where: torch.Tensor) -> int:
    out = pipe(image, budget=budget)
    kept = kept_patches(out.positions[0], out.mask[0], tuple(where.shape))
    assert int(out.mask[0].sum()) == budget
    return int((kept & where).sum())


def test_the_shipped_pipeline_keeps_no_token_on_a_fundus_mask_or_its_rim(pipes) -> None:
    on, off = pipes
    image = _fundus()
    flat, valid = _patches(image)
    frame = frame_patches(flat, valid)[0]
    assert off.config.balance.pick_frame is False
    assert _kept_on(off, image, 16, frame) > 0  # max-min alone goes for the rim: the defect this guards against
    assert _kept_on(on, image, 16, frame) == 0
    picture = int((~frame).sum())
    out = on(image, budget=picture + 5)  # more than the picture holds: the exact budget, the border last
    assert int(out.mask[0].sum()) == picture + 5


@pytest.mark.parametrize("size", [224, 384])
def test_the_generated_world_has_no_border_and_picks_the_same(pipes, size: int) -> None:
    on, off = pipes
    for seed in range(700_000, 700_004):
        image = torch.from_numpy(np.array(make_sample(seed, size).image)).permute(2, 0, 1).float() / 255
        flat, valid = _patches(image)
        assert not frame_patches(flat, valid).any(), seed
        a, b = on(image, budget=size // 16 * 2), off(image, budget=size // 16 * 2)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens), seed
