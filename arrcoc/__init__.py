"""arrcoc: relevance-driven visual token compression for vision-language models.

Importing arrcoc touches no GPU, changes no global setting and prints nothing.
"""

from .config import BalanceConfig, PipelineConfig
from .errors import (
                     ArrcocError,
                     BudgetError,
                     EncoderError,
                     ImageLoadError,
                     InvalidInputError,
                     InvalidTypeError,
                     MissingWeightsError,
)
from .outputs import CompressionOutput, ScoreOutput
from .pipeline import Pipeline
from .runtime.graphs import CaptureError, CaptureMemoryError, GraphCache, StaleOutputError

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "PipelineConfig",
    "GraphCache",
    "BalanceConfig",
    "ScoreOutput",
    "CompressionOutput",
    "ArrcocError",
    "InvalidInputError",
    "InvalidTypeError",
    "ImageLoadError",
    "BudgetError",
    "EncoderError",
    "MissingWeightsError",
    "CaptureError",
    "CaptureMemoryError",
    "StaleOutputError",
    "__version__",
]
