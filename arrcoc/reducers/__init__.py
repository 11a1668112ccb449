"""Token reducers: a grid of visual features -> exactly ``K`` tokens, behind one interface and a registry.

``create_reducer(name)`` builds arrcoc's reducer (``arrcoc``, its ablations) or a public baseline (``tome``,
``divprune``, ...); ``list_reducers()`` names them all.
"""

from .arrcoc import ArrcocReducer
from .registry import (
    REDUCERS,
    ReducedTokens,
    Reducer,
    VisualInput,
    check_budget,
    check_visual,
    create_reducer,
    list_reducers,
    register_reducer,
)

__all__ = [
    "VisualInput",
    "ReducedTokens",
    "Reducer",
    "REDUCERS",
    "register_reducer",
    "create_reducer",
    "list_reducers",
    "check_budget",
    "check_visual",
    "ArrcocReducer",
]
