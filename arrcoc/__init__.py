"""arrcoc: relevance-driven visual token compression for vision-language models.

Importing arrcoc touches no GPU, changes no global setting and prints nothing. The public names load on first
use (PEP 562), so ``import arrcoc.cli`` answers ``arrcoc --help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module (under arrcoc) that defines it.
_LAZY: dict[str, str] = {
    "Pipeline": "pipeline",
    "PipelineConfig": "config",
    "GraphCache": "runtime.graphs",
    "BalanceConfig": "config",
    "ScoreOutput": "outputs",
    "CompressionOutput": "outputs",
    "ArrcocError": "errors",
    "InvalidInputError": "errors",
    "InvalidTypeError": "errors",
    "ImageLoadError": "errors",
    "BudgetError": "errors",
    "EncoderError": "errors",
    "MissingWeightsError": "errors",
    "CaptureError": "runtime.graphs",
    "CaptureMemoryError": "runtime.graphs",
    "StaleOutputError": "runtime.graphs",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:  # for type checkers and editors: the names as if imported eagerly
    from .config import BalanceConfig, PipelineConfig  # noqa: F401
    from .errors import (  # noqa: F401
        ArrcocError,
        BudgetError,
        EncoderError,
        ImageLoadError,
        InvalidInputError,
        InvalidTypeError,
        MissingWeightsError,
    )
    from .outputs import CompressionOutput, ScoreOutput  # noqa: F401
    from .pipeline import Pipeline  # noqa: F401
    from .runtime.graphs import CaptureError, CaptureMemoryError, GraphCache, StaleOutputError  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'arrcoc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
