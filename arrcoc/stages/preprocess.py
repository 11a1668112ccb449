"""Preprocess: any image input -> square bucketed tensors, a valid-pixel mask and the map back to source pixels.

The only step of arrcoc that looks at Python values. Each image goes to the smallest configured bucket size
``S`` that holds its long side (larger images go to the largest bucket), its long side is resized to exactly
``S`` (antialiased bilinear, up or down), and it is anchored at the top-left and padded on the right/bottom.
A bucket pixel ``(x, y)`` is the source pixel ``(x / scale, y / scale)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ..errors import ImageLoadError, InvalidInputError, InvalidTypeError
from .gpu_input import decode_jpegs, jpeg_file, letterbox, placement

__all__ = ["DEFAULT_BUCKETS", "PreprocessedBatch", "Preprocessor", "load_image"]

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (224, 384, 512, 768, 1024)

_WHITE = 1.0  # alpha is composited over white


@dataclass
class PreprocessedBatch:
    """Images of one bucket size, ready for the encoder.

    Attributes:
        pixels: ``(B, 3, S, S)`` float32 RGB in [0, 1].
        valid: ``(B, 1, S, S)`` float32, 1 where a pixel comes from the image, 0 in the padding.
        scale: ``(B,)`` float32 bucket pixels per source pixel.
        source_size: ``(B, 2)`` int64 ``(height, width)`` of the source after EXIF orientation.
        content_size: ``(B, 2)`` int64 ``(height, width)`` of the resized image inside the bucket.
        indices: position of each image in the caller's input.
        names: a display name per image (the file path, or ``"<tensor 0>"``...).
        bucket: ``S``.
    """

    pixels: Tensor
    valid: Tensor
    scale: Tensor
    source_size: Tensor
    content_size: Tensor
    indices: list[int]
    names: list[str]
    bucket: int

    def to(self, device: torch.device | str) -> PreprocessedBatch:
        return replace(self, pixels=self.pixels.to(device), valid=self.valid.to(device))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(source: Any, index: int | None) -> str:
    where = "" if index is None else f"image {index}"
    if isinstance(source, (str, os.PathLike)):
        return f"{where} ({os.fspath(source)})" if where else os.fspath(source)
    kind = "PIL image" if isinstance(source, Image.Image) else type(source).__name__
    return f"{where} ({kind})" if where else kind


def _pil_to_tensor(image: Image.Image, name: str) -> Tensor:
    """A PIL image of any mode -> ``(3, H, W)`` float32 in [0, 1]."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        data = np.asarray(image.convert("I") if mode != "I" else image, dtype=np.float64)
        gray = torch.from_numpy(np.clip(data, 0, 65535) / 65535.0).float()
        return gray.expand(3, -1, -1).contiguous()
    if mode == "F":
        data = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        _check_float(data, name)
        return data.expand(3, -1, -1).contiguous()
    if mode == "La":  # premultiplied: Pillow converts it only to LA
        image, mode = image.convert("LA"), "LA"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in image.info)
    rgb = image.convert("RGBA" if has_alpha else "RGB")
    array = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return _composite(array)


def _composite(array: Tensor) -> Tensor:
    """``(C, H, W)`` with C in {1, 3, 4} -> RGB, alpha composited over white."""
    if array.shape[0] == 1:
        return array.expand(3, -1, -1).contiguous()
    if array.shape[0] == 4:
        rgb, alpha = array[:3], array[3:]
        return rgb * alpha + _WHITE * (1 - alpha)
    return array


def _check_float(data: Tensor, name: str) -> None:
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        raise InvalidInputError(f"{name}: pixel values must be finite; {int((~finite).sum())} are NaN or infinite")
    low, high = float(data.min()), float(data.max())
    if low < 0 or high > 1:
        outside = int(((data < 0) | (data > 1)).sum())
        raise InvalidInputError(
            f"{name}: float pixel values must be in [0, 1]; {outside} are outside (min {low:.4g}, max {high:.4g})"
        )


def _array_to_tensor(data: Tensor, name: str) -> Tensor:
    """A single image tensor, (H, W), (C, H, W) or (H, W, C) -> ``(3, H, W)`` float32 in [0, 1]."""
    if data.layout != torch.strided or data.is_quantized or data.is_nested:
        raise InvalidTypeError(
            f"{name}: image tensors must be dense (strided); got layout {data.layout}"
            f"{' (quantized)' if data.is_quantized else ''}"
        )
    if data.device.type == "meta":
        raise InvalidInputError(f"{name}: image tensors must hold data; got a tensor on the meta device")
    data = data.cpu()  # ok-sync: preprocess reads values
    if data.dtype == torch.bool or data.is_complex():
        raise InvalidTypeError(f"{name}: image tensors must be uint8, uint16 or floating point; got {data.dtype}")
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3:
        if data.shape[0] not in (1, 3, 4):
            if data.shape[-1] in (1, 3, 4):
                data = data.permute(2, 0, 1)
            else:
                raise InvalidInputError(
                    f"{name}: a 3-D image must have 1, 3 or 4 channels first (C, H, W) or last "
                    f"(H, W, C); got shape {tuple(data.shape)}"
                )
    else:
        raise InvalidInputError(f"{name}: an image must be 2-D or 3-D; got shape {tuple(data.shape)}")
    if data.shape[-1] == 0 or data.shape[-2] == 0:
        raise InvalidInputError(f"{name}: the image is empty (shape {tuple(data.shape)})")
    if data.dtype == torch.uint8:
        data = data.float() / 255.0
    elif data.dtype in (torch.uint16, torch.int32, torch.int64, torch.int16) and not data.is_floating_point():
        if data.dtype != torch.uint16:
            raise InvalidTypeError(f"{name}: integer images must be uint8 or uint16; got {data.dtype}")
        data = data.to(torch.int32).float() / 65535.0
    elif data.is_floating_point():
        data = data.float()
        _check_float(data, name)
    else:
        raise InvalidTypeError(f"{name}: unsupported dtype {data.dtype}")
    return _composite(data)


def _decode(read: Any, name: str) -> Image.Image:
    """Run ``read()`` (which decodes an image); any failure of the decoder becomes an :class:`ImageLoadError`.

    Pillow's plugins raise many types on corrupt data (OSError, SyntaxError, struct.error, EOFError,
    IndexError, ...); all of them mean the same thing to a caller: this image cannot be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return read()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(
            f"{name}: too many pixels for Pillow's decompression-bomb limit "
            f"(Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {err}"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image file Pillow can identify") from err  # its message: the path again
    except MemoryError as err:
        raise ImageLoadError(f"{name}: not enough memory to decode the image") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure on bad data
        kind = (
            type(err).__qualname__
            if type(err).__module__ == "builtins"
            else f"{type(err).__module__}.{type(err).__qualname__}"
        )
        raise ImageLoadError(f"{name}: cannot read the image (truncated or corrupt?): {kind}: {err}") from err


def _decode_file(path: str, name: str) -> Image.Image:
    def read() -> Image.Image:
        with Image.open(path) as image:
            image.load()  # decode fully here, so a truncated file fails now
            return ImageOps.exif_transpose(image)

    return _decode(read, name)


def load_image(source: Any, *, name: str | None = None) -> Tensor:
    """Read one image of any supported kind.

    Args:
        source: a path, a PIL image, a numpy array or a torch tensor (``(H, W)``, ``(C, H, W)``, ``(H, W, C)``).
        name: how errors refer to it (default: the path or the type).

    Returns:
        ``(3, H, W)`` float32 RGB in [0, 1], EXIF orientation applied.

    Raises:
        ImageLoadError: a file that is missing, not an image, truncated, corrupt, or too large (Pillow's
            decompression-bomb limit); the message names the file.
        InvalidInputError, InvalidTypeError: arrays and tensors of the wrong shape, type or range.
    """
    name = name or _describe(source, None)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageLoadError(f"{name}: no such file")
        if os.path.isdir(path):
            raise ImageLoadError(f"{name}: is a directory, not an image file")
        return _pil_to_tensor(_decode_file(path, name), name)
    if isinstance(source, Image.Image):
        return _pil_to_tensor(_decode(lambda: ImageOps.exif_transpose(source), name), name)
    if isinstance(source, np.ndarray):
        if source.dtype.kind not in "uif" or source.dtype.itemsize > 8 or source.dtype in (np.uint32, np.uint64):
            raise InvalidTypeError(f"{name}: arrays must be uint8, uint16 or floating point; got {source.dtype}")
        native = source.dtype.newbyteorder("=")  # torch reads native byte order only
        tensor = torch.from_numpy(np.ascontiguousarray(source, dtype=np.int32 if source.dtype == np.uint16 else native))
        if source.dtype == np.uint16:
            tensor = tensor.to(torch.uint16)
        if source.ndim == 3 and source.shape[-1] in (1, 3, 4) and source.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
        elif source.ndim == 3 and source.shape[-1] in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)  # numpy images are channel-last
        return _array_to_tensor(tensor, name)
    if isinstance(source, Tensor):
        return _array_to_tensor(source.detach(), name)
    raise InvalidTypeError(
        f"{name}: expected a path, PIL image, numpy array or torch tensor; got {type(source).__name__}"
    )


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (Tensor, np.ndarray)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise InvalidInputError(f"images: got an empty batch of shape {tuple(images.shape)}")
        return list(images.unbind(0) if isinstance(images, Tensor) else images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInputError("images: got an empty list")
        out: list[Any] = []
        for item in images:
            if isinstance(item, (Tensor, np.ndarray)) and item.ndim == 4:
                out.extend(_as_list(item))
            else:
                out.append(item)
        return out
    if isinstance(images, Tensor) and images.ndim > 4:
        raise InvalidInputError(f"images: a tensor batch must be (B, C, H, W); got shape {tuple(images.shape)}")
    return [images]


#: JPEG files per batched decode: bounds the letterbox's source batch, padded to its largest image.
_JPEG_CHUNK = 64
#: One placed image: (index, name, canvas (3, S, S), valid (1, S, S), scale, source (h, w), content (h, w)).
_Row = tuple[int, str, Tensor, Tensor, float, tuple[int, int], tuple[int, int]]


class Preprocessor:
    """Load, resize and letterbox images into square buckets.

    JPEG files (paths) that nvJPEG decodes as Pillow does are, on CUDA, decoded in one batched call on the GPU and
    letterboxed there a bucket at a time (:mod:`arrcoc.stages.gpu_input`, the data-set job's path): the same
    placement, pixels within a few levels of Pillow's. Any other input takes the per-image path.

    Args:
        buckets: bucket sizes; each image goes to the smallest that holds its long side.
        pad_value: the value of padding pixels.
        multiple: every bucket must be a multiple of this (the encoder's patch stride).
        batch_jpegs: decode JPEG files in batches on the call's device (``None``: where that device is CUDA).
    """

    def __init__(
        self,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        *,
        pad_value: float = 0.0,
        multiple: int = 32,
        batch_jpegs: bool | None = None,
    ) -> None:
        sizes = sorted(set(int(b) for b in buckets))
        if not sizes or any(b <= 0 or b % multiple for b in sizes):
            raise InvalidInputError(f"buckets must be positive multiples of {multiple}; got {tuple(buckets)}")
        self.buckets = tuple(sizes)
        self.pad_value = float(pad_value)
        self.batch_jpegs = batch_jpegs

    def bucket_for(self, height: int, width: int) -> int:
        """The smallest bucket holding the long side (the largest bucket for larger images)."""
        long = max(height, width)
        return next((b for b in self.buckets if b >= long), self.buckets[-1])

    def _place(
        self, image: Tensor, bucket: int, device: torch.device | None
    ) -> tuple[Tensor, Tensor, float, tuple[int, int]]:
        _, h, w = image.shape
        scale = bucket / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = image.to(device)
        if size != (h, w):
            image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        image = image.clamp(0, 1)  # antialiased resampling can overshoot slightly
        canvas = image.new_full((3, bucket, bucket), self.pad_value)
        canvas[:, : size[0], : size[1]] = image
        valid = image.new_zeros((1, bucket, bucket))
        valid[:, : size[0], : size[1]] = 1
        return canvas, valid, scale, size

    def _add(self, groups: dict[int, list[_Row]], index: int, name: str, image: Tensor, device: Any) -> None:
        h, w = image.shape[1:]
        bucket = self.bucket_for(h, w)
        canvas, valid, scale, size = self._place(image, bucket, device)
        groups.setdefault(bucket, []).append((index, name, canvas, valid, scale, (h, w), size))

    def _add_jpegs(
        self, groups: dict[int, list[_Row]], jpegs: list[tuple[int, str, Tensor, tuple[int, int]]], device: Any
    ) -> None:
        """Decode ``jpegs`` in one call on ``device`` and letterbox them a bucket at a time; if the decoder refuses
        the batch (a file it cannot read), each file takes the per-image path, which names any broken one."""
        try:
            decoded = decode_jpegs([data for _, _, data, _ in jpegs], device)
        except (RuntimeError, ValueError):
            for index, name, _, _ in jpegs:
                self._add(groups, index, name, load_image(name, name=f"image {index} ({name})"), device)
            return
        buckets: dict[int, list[tuple[int, str, Tensor, float, tuple[int, int], tuple[int, int]]]] = {}
        for (index, name, _, (h, w)), image in zip(jpegs, decoded):
            bucket, scale, content = placement(h, w, self.buckets)
            buckets.setdefault(bucket, []).append((index, name, image, scale, (h, w), content))
        for bucket, rows in buckets.items():
            pixels, valid = letterbox([r[2] for r in rows], [r[5] for r in rows], bucket, pad_value=self.pad_value)
            for (index, name, _, scale, size, content), canvas, mask in zip(rows, pixels, valid):
                groups.setdefault(bucket, []).append((index, name, canvas, mask, scale, size, content))

    def _bucket_batch(self, images: Any, device: torch.device | None) -> PreprocessedBatch | None:
        """A ``(B, 3, S, S)`` uint8 or floating tensor with ``S`` a bucket, as one batch made where it lies.

        Such a batch needs no resize and no padding, so it skips the per-image path, which reads each image
        back to the host (a sync per image on a GPU). Float pixels are checked with one host read for the whole
        batch. ``None``: anything else, or float pixels outside [0, 1] (the per-image path then names the image).
        The result equals the per-image path's.
        """
        if not (
            isinstance(images, Tensor)
            and images.ndim == 4
            and images.shape[0] > 0
            and images.shape[1] == 3
            and images.shape[2] == images.shape[3]
            and images.shape[2] in self.buckets
            and (images.dtype == torch.uint8 or images.dtype in _FLOATS)
            and images.layout == torch.strided
            and not images.is_quantized
            and not images.is_nested
            and images.device.type != "meta"
        ):
            return None
        data = images.detach().to(device if device is not None else torch.device("cpu"))  # uint8 travels small
        if data.dtype == torch.uint8:
            pixels = data / 255.0  # float32 in one kernel (a cast, then a division, would launch two)
        else:
            pixels = data.float()  # the per-image path checks after the same cast (float64 1e300 is inf in float32)
            inside = torch.isfinite(pixels).all() & (pixels.amin() >= 0) & (pixels.amax() <= 1)
            if not bool(inside):  # ok-sync: one read for the batch instead of one per image
                return None
        b, _, size, _ = pixels.shape
        sizes = torch.tensor([[size, size]] * b, dtype=torch.long)
        return PreprocessedBatch(
            pixels=pixels.contiguous(),
            valid=pixels.new_ones((b, 1, size, size)),
            scale=torch.ones(b, dtype=torch.float32),
            source_size=sizes,
            content_size=sizes.clone(),
            indices=list(range(b)),
            names=[_describe(data, i) for i in range(b)],
            bucket=size,
        )

    def __call__(self, images: Any, *, device: torch.device | str | None = None) -> list[PreprocessedBatch]:
        """Preprocess one image or a batch (a list mixing any supported kinds, or a 4-D tensor).

        Returns:
            one :class:`PreprocessedBatch` per bucket used, ascending by bucket; ``indices`` say where each
            image came from.
        """
        device = torch.device(device) if device is not None else None
        ready = self._bucket_batch(images, device)
        if ready is not None:
            return [ready]
        items = _as_list(images)
        batched = (device is not None and device.type == "cuda") if self.batch_jpegs is None else self.batch_jpegs
        groups: dict[int, list[_Row]] = {}
        jpegs: list[tuple[int, str, Tensor, tuple[int, int]]] = []  # (index, path, bytes, (h, w))
        for index, item in enumerate(items):
            path = isinstance(item, (str, os.PathLike))
            name = os.fspath(item) if path else _describe(item, index)
            if batched and path and (found := jpeg_file(name)) is not None:
                jpegs.append((index, name, *found))
                continue
            self._add(groups, index, name, load_image(item, name=f"image {index} ({name})" if path else name), device)
        for start in range(0, len(jpegs), _JPEG_CHUNK):
            self._add_jpegs(groups, jpegs[start : start + _JPEG_CHUNK], device or torch.device("cpu"))
        out = []
        for bucket in sorted(groups):
            rows = sorted(groups[bucket], key=lambda row: row[0])
            out.append(
                PreprocessedBatch(
                    pixels=torch.stack([r[2] for r in rows]),
                    valid=torch.stack([r[3] for r in rows]),
                    scale=torch.tensor([r[4] for r in rows], dtype=torch.float32),
                    source_size=torch.tensor([r[5] for r in rows], dtype=torch.long),
                    content_size=torch.tensor([r[6] for r in rows], dtype=torch.long),
                    indices=[r[0] for r in rows],
                    names=[r[1] for r in rows],
                    bucket=bucket,
                )
            )
        return out
