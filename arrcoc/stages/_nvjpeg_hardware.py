"""nvJPEG's hardware JPEG decoder (the NVJPG engines of A100, H100, H200 and later data-centre GPUs), reached
through ctypes in the nvJPEG library that torchvision already loads.

torchvision's ``decode_jpeg(..., device="cuda")`` decodes on the GPU's SMs (nvJPEG's hybrid backend), one batch at a
time in a process: for photos that is what bounds the data-set job (27.1 ms a batch of 64 on the H200,
``bench/results/dataset-steps-nvidia-h200.txt``). The hardware backend decodes on the separate JPEG engines instead,
leaving the SMs to the pipeline. It decodes baseline JPEGs only; :meth:`HardwareDecoder.decodable` asks nvJPEG about
each file, and the others stay torchvision's.

:func:`decoder` gives the device's decoder, or None where there is none (no CUDA, no hardware engine, no nvJPEG
library, or ``ARRCOC_JPEG_HARDWARE=0`` in the environment, read at import).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import glob
import os
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

#: Decode baseline JPEGs on the hardware engines where a GPU has them.
USE_HARDWARE: bool = os.environ.get("ARRCOC_JPEG_HARDWARE", "1") != "0"

_BACKEND_HARDWARE = 3  # nvjpegBackend_t
_OUTPUT_RGB = 3  # nvjpegOutputFormat_t: three planes, R, G, B
_MAX_COMPONENT = 4
_STATUS = {
    1: "not initialized",
    2: "invalid parameter",
    3: "bad JPEG",
    4: "JPEG not supported",
    5: "allocator failure",
    6: "execution failed",
    7: "architecture mismatch (no hardware decoder)",
    8: "internal error",
    9: "implementation not supported",
    10: "incomplete bitstream",
}


class _Image(ctypes.Structure):  # nvjpegImage_t
    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENT), ("pitch", ctypes.c_size_t * _MAX_COMPONENT)]


def _library_path() -> str | None:
    """The nvJPEG library torchvision's image extension uses (already mapped once torchvision.io is imported),
    else one found beside torchvision, in NVIDIA's wheels or on the loader's path."""
    try:
        import torchvision.io  # noqa: F401  (loads torchvision's image extension, and with it nvJPEG)

        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libnvjpeg" in os.path.basename(path) and os.path.exists(path):
                    return path
    except (ImportError, OSError):
        pass
    import torchvision

    site = os.path.dirname(os.path.dirname(torchvision.__file__))
    for pattern in ("torchvision.libs/libnvjpeg*.so*", "nvidia/*/lib/libnvjpeg*.so*"):
        found = sorted(glob.glob(os.path.join(site, pattern)))
        if found:
            return found[0]
    return ctypes.util.find_library("nvjpeg")


def _bind(lib: ctypes.CDLL) -> None:
    p, c_int, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    signatures = {
        "nvjpegCreateEx": [c_int, p, p, ctypes.c_uint, ctypes.POINTER(p)],
        "nvjpegJpegStateCreate": [p, ctypes.POINTER(p)],
        "nvjpegJpegStreamCreate": [p, ctypes.POINTER(p)],
        "nvjpegJpegStreamParseHeader": [p, p, size, p],
        "nvjpegDecodeBatchedSupported": [p, p, ctypes.POINTER(c_int)],
        "nvjpegGetImageInfo": [p, p, size, ctypes.POINTER(c_int), ctypes.POINTER(c_int), c_int * 4, c_int * 4],
        "nvjpegGetHardwareDecoderInfo": [p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint)],
        "nvjpegDecodeBatchedInitialize": [p, p, c_int, c_int, c_int],
        "nvjpegDecodeBatched": [p, p, ctypes.POINTER(p), ctypes.POINTER(size), ctypes.POINTER(_Image), p],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = c_int


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"nvJPEG {what} failed: status {status} ({_STATUS.get(status, 'unknown')})")


class HardwareDecoder:
    """Batched decoding of baseline JPEGs on one GPU's hardware engines.

    One handle, decoder state and parse stream per device, used under a lock (nvJPEG's state is not thread-safe).
    The decode is queued on the caller's current CUDA stream, as any PyTorch operation would be.
    """

    def __init__(self, lib: ctypes.CDLL, device: torch.device) -> None:
        self.lib, self.device = lib, device
        self.lock = threading.Lock()
        self.handle, self.state, self.stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle)), "create")
            _check(lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), "state")
            _check(lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(self.stream)), "stream")
        engines, cores = ctypes.c_uint(), ctypes.c_uint()
        self.engines = (
            (engines.value, cores.value)
            if lib.nvjpegGetHardwareDecoderInfo(self.handle, ctypes.byref(engines), ctypes.byref(cores)) == 0
            else None
        )
        self.batch_size = 0  # the batch size the state was initialised for
        # each batch's input bytes and descriptors, kept until its decode is done: nvJPEG may read them after its
        # call returns
        self.inflight: collections.deque[tuple[torch.cuda.Event, tuple[object, ...]]] = collections.deque()

    def decodable(self, data: Tensor) -> tuple[int, int] | None:
        """``(height, width)`` of a JPEG (``(bytes,)`` uint8 on the host) the engines decode to three channels, else
        None."""
        components, subsampling = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
        pointer, length = data.data_ptr(), data.numel()
        with self.lock:
            if self.lib.nvjpegGetImageInfo(
                self.handle, pointer, length, ctypes.byref(components), ctypes.byref(subsampling), widths, heights
            ):
                return None
            if components.value != 3:  # grey: torchvision's decoder gives its three equal channels
                return None
            if self.lib.nvjpegJpegStreamParseHeader(self.handle, pointer, length, self.stream):
                return None
            unsupported = ctypes.c_int(1)
            status = self.lib.nvjpegDecodeBatchedSupported(self.handle, self.stream, ctypes.byref(unsupported))
        return (heights[0], widths[0]) if status == 0 and unsupported.value == 0 else None

    def decode(self, data: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Decode JPEGs that are :meth:`decodable` into one packed uint8 block on the device.

        Args:
            data: each file's bytes, ``(bytes,)`` uint8 on the host.
            sizes: each file's ``(height, width)``.

        Returns:
            ``(3, h, w)`` uint8 views of the block, one per file.
        """
        count = len(data)
        numels = [3 * h * w for h, w in sizes]
        block = torch.empty(sum(numels), dtype=torch.uint8, device=self.device)
        images, destinations = [], (_Image * count)()
        offset = 0
        for k, ((h, w), numel) in enumerate(zip(sizes, numels)):
            image = block[offset : offset + numel].view(3, h, w)
            for c in range(3):
                destinations[k].channel[c] = image[c].data_ptr()
                destinations[k].pitch[c] = w
            images.append(image)
            offset += numel
        pointers = (ctypes.c_void_p * count)(*(t.data_ptr() for t in data))
        lengths = (ctypes.c_size_t * count)(*(t.numel() for t in data))
        stream = torch.cuda.current_stream(self.device)
        with self.lock:
            while self.inflight and self.inflight[0][0].query():
                self.inflight.popleft()
            if count != self.batch_size:
                _check(self.lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, count, 1, _OUTPUT_RGB), "init")
                self.batch_size = count
            status = self.lib.nvjpegDecodeBatched(
                self.handle, self.state, pointers, lengths, destinations, ctypes.c_void_p(stream.cuda_stream)
            )
            if status != 0:
                self.batch_size = 0  # nvJPEG asks for a fresh initialisation after a failed batch
            _check(status, "hardware decode")
            event = torch.cuda.Event()
            event.record(stream)
            self.inflight.append((event, (list(data), pointers, lengths, destinations)))
        return images


_DECODERS: dict[int, HardwareDecoder | None] = {}
_DECODERS_LOCK = threading.Lock()


def decoder(device: torch.device) -> HardwareDecoder | None:
    """The hardware decoder of a CUDA device, made on first use; None where there is none."""
    if not USE_HARDWARE or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _DECODERS_LOCK:
        if index not in _DECODERS:
            _DECODERS[index] = _make(torch.device("cuda", index))
        return _DECODERS[index]


def _make(device: torch.device) -> HardwareDecoder | None:
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        _bind(lib)
        return HardwareDecoder(lib, device)
    except (OSError, AttributeError, RuntimeError):  # no such library or symbol, or no engine on this GPU
        return None
