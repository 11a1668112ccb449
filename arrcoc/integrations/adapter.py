"""What the Hugging Face adapters (LLaVA, Qwen-VL) share: a prompt's ids with the image slots expanded, and the
reducer captured as a CUDA graph."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from torch import Tensor

from ..errors import InvalidInputError, InvalidTypeError
from ..runtime.graphs import CaptureError, GraphChain

__all__ = ["processor_parts", "check_prompting", "expand_prompt", "reducer_chain", "REDUCER_OUTPUTS"]

logger = logging.getLogger(__name__)

#: What a reducer graph returns (the fields of :class:`arrcoc.reducers.ReducedTokens`).
REDUCER_OUTPUTS = ("tokens", "positions", "weights", "relevance", "allocation")


def processor_parts(processor_or_tokenizer: Any) -> tuple[Any, Any]:
    """``(tokenizer, image processor or None)`` of a Hugging Face processor, or of a tokenizer given alone."""
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    if not callable(tokenizer):
        raise InvalidTypeError(
            f"processor_or_tokenizer must be a processor or a tokenizer; got {type(processor_or_tokenizer).__name__}"
        )
    return tokenizer, getattr(processor_or_tokenizer, "image_processor", None)


def check_prompting(template: str, query_temperature: float) -> None:
    """The prompt template holds ``{image}`` and ``{question}``, and the query's softmax temperature is positive."""
    if "{question}" not in template or "{image}" not in template:
        raise InvalidInputError(f"template must hold '{{image}}' and '{{question}}'; got {template!r}")
    if not query_temperature > 0:
        raise InvalidInputError(f"query_temperature must be > 0; got {query_temperature}")


def expand_prompt(
    prompt: str,
    slots: int,
    *,
    tokenizer: Any,
    template: str,
    image_token: str,
    image_token_id: int,
    special_ids: Collection[int],
) -> tuple[list[int], list[bool], int]:
    """Token ids of ``prompt`` with its image placeholder expanded to ``slots`` copies, which tokens form the query
    (the question's own words), and the placeholder's index.

    A prompt without the placeholder is a question, put into ``template`` (``{image}`` and ``{question}`` in it);
    one already in the template gives its question alone as the query; any other prompt with one placeholder is
    read whole.
    """
    if not isinstance(prompt, str):
        raise InvalidTypeError(f"prompts must be strings; got {type(prompt).__name__}")
    head, tail = (part.replace("{image}", image_token) for part in template.split("{question}"))
    if image_token not in prompt:
        span = (len(head), len(head) + len(prompt))
        prompt = head + prompt + tail
    elif prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        span = (len(head), len(prompt) - len(tail))  # a prompt already in the template: its question alone
    else:
        span = (0, len(prompt))
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(prompt, return_offsets_mapping=fast)
    ids = [int(i) for i in encoded["input_ids"]]
    offsets = encoded["offset_mapping"] if fast else [span] * len(ids)
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(where) != 1:
        raise InvalidInputError(
            f"each prompt must hold exactly one image placeholder {image_token!r} (or none, to "
            f"use the template); got {len(where)} in {prompt!r}"
        )
    query = [
        t not in special_ids and t != image_token_id and o[1] > span[0] and o[0] < span[1] for t, o in zip(ids, offsets)
    ]
    p = where[0]
    return ids[:p] + [image_token_id] * slots + ids[p + 1 :], query[:p] + [False] * slots + query[p + 1 :], p


def reducer_chain(
    fn: Callable[[dict[str, Any]], dict[str, Any]], inputs: dict[str, Tensor], backend: str, pool: Any, name: str
) -> GraphChain | None:
    """``fn`` (a reducer as a state step) captured as a :class:`GraphChain` on ``inputs``; ``None``, with one
    warning, where it cannot be captured (the caller then calls the reducer directly)."""
    try:
        return GraphChain(
            [("reduce", fn)],
            inputs,
            pool if backend == "cuda" else None,
            outputs=REDUCER_OUTPUTS,
            backend=backend,
            name=name,
        )
    except CaptureError as err:
        logger.warning("the %s cannot be captured as a CUDA graph (%s); calling it directly", name, err)
        return None
