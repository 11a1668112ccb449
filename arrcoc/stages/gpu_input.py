"""The batched input path: JPEG bytes -> one letterboxed bucket batch, made on the device (the data-set job's, and
the :class:`~arrcoc.stages.preprocess.Preprocessor`'s for JPEG files on CUDA).

:func:`jpeg_size` reads a JPEG's header on the host and says whether nvJPEG decodes it
as Pillow does (8-bit, grey or YCbCr, no EXIF rotation, no trailing data); :func:`decode_jpegs` decodes such
files in batched calls (on the GPU's JPEG engines where it has them, ``_nvjpeg_hardware``, else on its SMs);
:func:`letterbox` resizes and pads a whole bucket at once, as the :class:`~arrcoc.stages.preprocess.Preprocessor`
does one image at a time (antialiased bilinear resize of the long side to the bucket, anchored top-left, padded
right/bottom), with the valid mask made on the device.

The resize is separable. On CUDA, for bytes, two Triton kernels (``_resize_triton``) read each output pixel's filter
taps straight from the images' packed bytes. Elsewhere (and with ``ARRCOC_RESIZE_KERNEL=0`` in the environment, read
at import, or ``gpu_input.USE_KERNEL = False``) it is two batched matrix products over images padded to the batch's
largest source: ``out = Wy @ X @ Wxᵀ`` with ``Wy (B, S, H)`` and ``Wx (B, S, W)`` the antialiased bilinear weights
PyTorch's ``interpolate(..., antialias=True)`` uses; rows and columns outside an image's content have zero weight,
so the padding comes out as zeros. Either way there is no per-image kernel.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _nvjpeg_hardware
from .kernels import kernel_enabled

__all__ = [
    "JPEG_SUFFIXES",
    "decode_jpegs",
    "jpeg_file",
    "jpeg_size",
    "letterbox",
    "placement",
    "resize_weights",
    "valid_mask",
]

#: Resize bytes on CUDA with the Triton kernels (else the matrix products).
USE_KERNEL: bool = kernel_enabled("ARRCOC_RESIZE_KERNEL")

#: Files from this size up are read into page-locked memory when the caller asks for it: nvJPEG's copies of pageable
#: bytes are staged by the host (115 µs a photo on the H200), while a page-locked block costs more than that to hand
#: out for a small file (H200, two runs each: photos of 142-919 KiB 2,023-2,045 images/s pinned against 1,918-1,992
#: pageable; JPEGs of 8-59 KiB 4,654-4,703 against 5,043-5,066; ``bench/results/dataset-pinned-nvidia-h200.txt``).
PINNED_MIN_BYTES = 128 * 1024

#: Files from this size up go to the GPU's JPEG engines where it has them; smaller ones decode faster on the SMs
#: (H100, batches of 64, decoding alone, two rounds: photos of 142-919 KiB 3,696 / 4,714 images/s on the engines
#: against 3,400 / 4,107 on the SMs; JPEGs of 8-59 KiB 25,601 / 25,547 against 28,126 / 29,757;
#: ``bench/results/nvjpeg-hardware-nvidia-h100-80gb-hbm3.txt``).
ENGINE_MIN_BYTES = 128 * 1024

#: File name endings of the files whose header is read to route them to the batched JPEG decoder.
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")

#: Start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman coded).
_SOF_DECODED = (0xC0, 0xC1, 0xC2)
#: Other start-of-frame markers (lossless, hierarchical, arithmetic coding): the CPU decoder's.
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _exif_orientation(tiff: bytes) -> int | None:
    """The EXIF orientation tag of a TIFF block (1 when absent); None when the block cannot be read."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8 : entry + 10], order)
    return 1


def _read_file(path: str | os.PathLike[str], pinned: bool = False) -> Tensor:
    """A file's bytes as a ``(bytes,)`` uint8 tensor, read straight into its memory; ``pinned``: page-locked memory
    (torch's caching host allocator) for a file of :data:`PINNED_MIN_BYTES` or more, from which nvJPEG's copies to the
    device run as DMA."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if pinned and size >= PINNED_MIN_BYTES:
            data = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            buffer: bytearray | memoryview = memoryview(data.numpy())
        else:
            buffer = bytearray(size)
            data = torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        got = handle.readinto(buffer)
    return data[:got]  # a file that shrank meanwhile: its header check refuses what is left


def jpeg_file(path: str, pinned: bool = False) -> tuple[Tensor, tuple[int, int]] | None:
    """A JPEG file's bytes (``(bytes,)`` uint8, in page-locked memory with ``pinned`` when it is large) and
    ``(height, width)`` when nvJPEG decodes it as Pillow does; None for any other file, and for one that cannot be read
    (Pillow's path then names the problem)."""
    if not path.lower().endswith(JPEG_SUFFIXES):
        return None
    try:
        data = _read_file(path, pinned)
    except OSError:
        return None
    size = jpeg_size(memoryview(data.numpy()))
    return None if size is None else (data, size)


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG that nvJPEG decodes to the pixels Pillow gives, else None.

    None (the CPU decoder's file) for: not a JPEG, a CMYK/Adobe-transformed, 12-bit, lossless or arithmetic
    coded one, an EXIF orientation other than 1 (Pillow rotates it), a header that cannot be read, or a file
    that does not end with the end-of-image marker (truncated: Pillow refuses it, nvJPEG might not).
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    pos, size, end = 2, None, len(data)
    # a reader thread runs this for every JPEG, holding the GIL: segments are skipped by their length, and only
    # those that decide the answer are sliced
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == 0xDA:  # start of scan: every header segment has been seen
            return size
        if marker in _SOF_OTHER:
            return None
        if marker in _SOF_DECODED or marker == 0xE1 or marker == 0xEE:
            segment = data[pos + 4 : pos + 2 + length]
            if marker == 0xE1 and segment[:6] == b"Exif\0\0" and _exif_orientation(segment[6:]) != 1:
                return None
            if marker == 0xEE and segment[:5] == b"Adobe":  # colour transform flags Pillow honours
                return None
            if marker in _SOF_DECODED:
                if len(segment) < 6 or segment[0] != 8 or segment[5] not in (1, 3):
                    return None
                size = (segment[1] << 8 | segment[2], segment[3] << 8 | segment[4])
                if 0 in size:
                    return None
        pos += 2 + length
    return None


def placement(height: int, width: int, buckets: Sequence[int]) -> tuple[int, float, tuple[int, int]]:
    """``(bucket, scale, (content height, content width))`` of an image, as the Preprocessor places it."""
    long = max(height, width)
    bucket = next((b for b in sorted(buckets) if b >= long), max(buckets))
    scale = bucket / long
    return bucket, scale, (max(1, round(height * scale)), max(1, round(width * scale)))


def decode_jpegs(data: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Decode JPEG files (1-D uint8 CPU tensors of their bytes) on ``device`` in batched nvJPEG calls.

    On a GPU with JPEG engines (A100, H100, H200, ...) the baseline colour files of :data:`ENGINE_MIN_BYTES` or more
    are decoded there, into one block, and the others on the SMs by torchvision; elsewhere torchvision decodes all of
    them. Both give the same pixels (the same bytes on the H100).

    Returns:
        one ``(3, h, w)`` uint8 tensor per file, in order (grey files as three equal channels).

    Raises:
        RuntimeError: a file nvJPEG cannot decode (the batched call returns nothing then).
    """
    engine = _nvjpeg_hardware.decoder(device) if device.type == "cuda" else None
    if engine is None:
        return _decode_on_sms(data, device)
    sizes = [engine.decodable(t) if t.numel() >= ENGINE_MIN_BYTES else None for t in data]
    hardware = [k for k, size in enumerate(sizes) if size is not None]
    if not hardware:
        return _decode_on_sms(data, device)
    images: list[Tensor] = [None] * len(data)  # type: ignore[list-item]
    for k, image in zip(hardware, engine.decode([data[k] for k in hardware], [sizes[k] for k in hardware])):
        images[k] = image
    rest = [k for k, size in enumerate(sizes) if size is None]
    if rest:
        for k, image in zip(rest, _decode_on_sms([data[k] for k in rest], device)):
            images[k] = image
    return images


def _decode_on_sms(data: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """torchvision's batched nvJPEG decode (on the CPU without CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type != "cuda":
            return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
        # torchvision allocates the images on the current stream but writes them on a stream of its own that
        # does not wait for the current one, so memory the current stream's queued kernels still read could be
        # overwritten. Allocated on a side stream instead, and marked as used by the current stream, a block
        # is reused only once the current stream is done with it.
        current = torch.cuda.current_stream(device)
        side = _side_stream(current.device_index)
        with torch.cuda.stream(side):
            images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)  # side waits for the decoder
        current.wait_stream(side)
        for image in images:
            image.record_stream(current)
        return images


#: One side stream per device for decode_jpegs' allocations, made on first use (imports stay inert).
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(index: int) -> torch.cuda.Stream:
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def resize_weights(source: Tensor, content: Tensor, span_in: int, span_out: int, dtype: torch.dtype) -> Tensor:
    """Antialiased bilinear resampling weights along one axis, as ``F.interpolate(antialias=True)`` computes them.

    Args:
        source: ``(B,)`` source lengths; ``content``: ``(B,)`` resized lengths (both on the device).
        span_in: columns (at least ``source.max()``); ``span_out``: rows (at least ``content.max()``).

    Returns:
        ``(B, span_out, span_in)``: row ``i`` of image ``b`` holds the weights of output pixel ``i``; rows at or
        past ``content[b]`` and columns at or past ``source[b]`` are zero.
    """
    device = source.device
    scale = (source.double() / content.double())[:, None, None]  # (B, 1, 1) input pixels per output pixel
    i = torch.arange(span_out, device=device, dtype=torch.float64)[None, :, None]
    j = torch.arange(span_in, device=device, dtype=torch.float64)[None, None, :]
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))  # the filter widens when shrinking
    weights = (1 - ((j - scale * (i + 0.5) + 0.5) * invscale).abs()).clamp_(min=0)  # (B, span_out, span_in)
    weights = weights * ((j < source[:, None, None]) & (i < content[:, None, None]))
    return (weights / weights.sum(-1, keepdim=True).clamp_(min=1e-30)).to(dtype)


def letterbox(
    images: Sequence[Tensor],
    sizes: Sequence[tuple[int, int]],
    bucket: int,
    *,
    pad_value: float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Resize and pad images of one bucket at once: the Preprocessor's placement, batched.

    Args:
        images: ``(3, h, w)`` uint8 (0-255) or floating (0-1) tensors, all on one device.
        sizes: each image's ``(content height, content width)`` inside the bucket (:func:`placement`).
        bucket: the square side ``S``.
        pad_value: the value of padding pixels.
        dtype: the dtype of the matrix products (default: float16 on CUDA, whose 11-bit weights move a pixel by
            well under one 8-bit level, and float32 elsewhere); the kernels for bytes on CUDA compute in float32.

    Returns:
        ``pixels (B, 3, S, S)`` float32 in [0, 1] and ``valid (B, 1, S, S)`` float32, 1 on the content.
    """
    device = images[0].device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    shapes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]  # host metadata, no sync
    numels = [3 * h * w for h, w in shapes]
    offsets = [0]
    for n in numels[:-1]:
        offsets.append(offsets[-1] + n)
    span_h, span_w = max(h for h, _ in shapes), max(w for _, w in shapes)
    meta = torch.tensor([[o, h, w, ch, cw] for o, (h, w), (ch, cw) in zip(offsets, shapes, sizes)], dtype=torch.long)
    # from pageable memory: the driver stages so small a copy at once, where pinning it could wait for a block
    meta = meta.to(device, non_blocking=True)
    valid = valid_mask(meta[:, 3:], bucket)
    if USE_KERNEL and device.type == "cuda" and images[0].dtype == torch.uint8:
        from . import _resize_triton  # Triton is imported on the first CUDA call only

        flat = _packed(images, offsets, numels)
        if flat is None:
            flat = torch.cat([t.reshape(-1) for t in images])
        return _resize_triton.launch(flat, meta, shapes, list(sizes), bucket, pad_value), valid
    offset, height, width, content_h, content_w = meta.unbind(1)  # each (B,)
    # every image's pixels one after another, then a row's worth of zeros so that any row can start anywhere
    flat = torch.cat([*(t.reshape(-1) for t in images), images[0].new_zeros(span_w)])
    # Gather into (B, 3, H, W), padded to the largest source, one source row at a time: a sliding-window view of
    # ``flat`` has a row starting at every element, so the index is (B, 3, H), not (B, 3, H, W). Past an image's
    # own width a row reads on into the next one, past its height any row (their weights are zero).
    channel = torch.arange(3, device=device)[None, :, None]
    row = torch.arange(span_h, device=device)[None, None, :]
    starts = (offset[:, None, None] + channel * (height * width)[:, None, None] + row * width[:, None, None]).clamp_(
        max=flat.numel() - span_w
    )  # (B, 3, H)
    windows = flat.as_strided((flat.numel() - span_w + 1, span_w), (1, 1))
    source = windows[starts].to(dtype)  # (B, 3, H, W)
    if images[0].dtype == torch.uint8:
        span = 255.0
    else:
        span = 1.0
    along_w = resize_weights(width, content_w, span_w, bucket, dtype)  # (B, S, W)
    along_h = resize_weights(height, content_h, span_h, bucket, dtype)  # (B, S, H)
    half = source @ along_w.transpose(1, 2)[:, None]  # (B, 3, H, S)
    pixels = (along_h[:, None] @ half).float()  # (B, 3, S, S)
    if span != 1.0:
        pixels = pixels.div_(span)
    pixels = pixels.clamp_(0, 1)  # as the Preprocessor: antialiased resampling can overshoot slightly
    if pad_value != 0.0:
        pixels = torch.where(valid.bool(), pixels, pad_value)
    return pixels, valid


def _packed(images: Sequence[Tensor], offsets: list[int], numels: list[int]) -> Tensor | None:
    """The images as one flat view when they already lie one after another in one block (the hardware decoder's
    output), else None."""
    first = images[0]
    base, storage = first.data_ptr(), first.untyped_storage().data_ptr()
    for image, offset in zip(images, offsets):
        if (
            not image.is_contiguous()
            or image.data_ptr() - base != offset
            or image.untyped_storage().data_ptr() != storage
        ):
            return None
    return first.as_strided((offsets[-1] + numels[-1],), (1,))


def valid_mask(content: Tensor, bucket: int) -> Tensor:
    """``(B, 1, S, S)`` float32, 1 on each image's content (top-left ``content[b]`` = ``(height, width)``)."""
    side = torch.arange(bucket, device=content.device)
    inside_h = side[None, :] < content[:, 0, None]  # (B, S)
    inside_w = side[None, :] < content[:, 1, None]  # (B, S)
    return (inside_h[:, None, :, None] & inside_w[:, None, None, :]).float()
