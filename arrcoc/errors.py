"""The one error family of arrcoc.

Every input the public API rejects raises a subclass of :class:`ArrcocError`. Where Python has a natural
base for the failure (a bad value, a bad type), the subclass derives from it too, so ``except ValueError``
in a caller's code keeps working.
"""

from __future__ import annotations

__all__ = [
    "ArrcocError",
    "InvalidInputError",
    "InvalidTypeError",
    "ImageLoadError",
    "BudgetError",
    "EncoderError",
    "MissingWeightsError",
]


class ArrcocError(Exception):
    """Base class of every error arrcoc raises on purpose."""


class InvalidInputError(ArrcocError, ValueError):
    """An argument has the right type but a value arrcoc cannot use."""


class InvalidTypeError(ArrcocError, TypeError):
    """An argument has a type arrcoc does not accept."""


class ImageLoadError(InvalidInputError):
    """An image file or object could not be read; the message names the file."""


class BudgetError(InvalidInputError):
    """A token budget cannot be met: below the minimum, above the capacity, or not a whole number."""


class EncoderError(ArrcocError, ValueError):
    """A backbone cannot serve as an encoder (for example, it yields no spatial grid)."""


class MissingWeightsError(ArrcocError, RuntimeError):
    """A feature needs trained weights that are not loaded (for example, a text query with no text encoder)."""
