"""Validation every LM backend applies the same way: sampling values and prompts.

No torch here: the vLLM backend uses it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from meshserve.errors import InvalidArgument
from worker.backends.detok import StopMatcher
from worker.types import GenerateInput, SamplingParams


def validate_sampling(p: SamplingParams) -> None:
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {p.top_p}")
    if p.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {p.top_k}")
    if p.max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {p.max_tokens}")
    if any(not s for s in p.stop):
        raise InvalidArgument("stop strings must be non-empty")


def prompt_ids(
    request: GenerateInput,
    *,
    model: str,
    encode: Callable[[str], list[int]],
    vocab_size: int,
    context: int,
    limit: int | None = None,
) -> list[int]:
    """The request's prompt as token ids, checked against the vocabulary and against
    `limit` tokens of prompt + completion (default: the model's `context`; less when a
    worker's KV cache per sequence is shorter)."""
    if (request.prompt is None) == (request.prompt_token_ids is None):
        raise InvalidArgument("set exactly one of prompt and prompt_token_ids")
    if request.prompt is not None:
        ids = [int(i) for i in encode(request.prompt)]
        if not ids:
            raise InvalidArgument(f"the prompt encodes to no tokens for model {model}")
    else:
        ids = list(request.prompt_token_ids or ())
        if not ids:
            raise InvalidArgument("prompt_token_ids is empty: give at least one token id")
        for i, tid in enumerate(ids):
            if not 0 <= tid < vocab_size:
                raise InvalidArgument(
                    f"prompt_token_ids[{i}] = {tid} is out of range: model {model} has "
                    f"{vocab_size} tokens (ids 0..{vocab_size - 1})"
                )
    max_tokens = request.sampling.max_tokens
    total = len(ids) + max_tokens
    limit = context if limit is None else limit
    if total > limit:
        where = (
            f"the context length {limit} of model {model}"
            if limit == context
            else f"the {limit}-token KV cache per sequence of model {model} on this worker "
            f"(context length {context})"
        )
        raise InvalidArgument(
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: {total} "
            f"exceeds {where}; shorten the prompt or lower max_tokens"
        )
    return ids


def continuation_ids(request: GenerateInput, *, model: str, vocab_size: int) -> list[int]:
    """The request's continued tokens (a resumed stream), checked against the vocabulary
    and against max_tokens, which counts them too."""
    ids = list(request.continuation)
    if len(ids) >= request.sampling.max_tokens:
        raise InvalidArgument(
            f"continuation.token_ids has {len(ids)} tokens and max_tokens is "
            f"{request.sampling.max_tokens} (it counts the continued tokens too): nothing "
            "is left to generate",
            field="continuation.token_ids",
        )
    for i, tid in enumerate(ids):
        if not 0 <= tid < vocab_size:
            raise InvalidArgument(
                f"continuation.token_ids[{i}] = {tid} is out of range: model {model} has "
                f"{vocab_size} tokens",
                field="continuation.token_ids",
            )
    return ids


def replay(
    ids: Iterable[int],
    texts: Callable[[int], str],
    stopper: StopMatcher,
    is_eos: Callable[[int], bool],
) -> None:
    """Feed continued tokens through a new stream's text state, releasing nothing.

    The first worker fed the same tokens through the same detokenizer and stop matcher,
    so afterwards both hold the same state: text it held back (an incomplete character,
    the start of a stop string) comes out here, and a stop string straddling the break
    still matches."""
    for tid in ids:
        if is_eos(tid):
            raise InvalidArgument(
                "continuation.token_ids holds an end-of-sequence token: that stream had ended",
                field="continuation.token_ids",
            )
        if stopper.feed(texts(tid))[1]:
            raise InvalidArgument(
                "continuation.token_ids already contains a stop string: that stream had ended",
                field="continuation.token_ids",
            )
