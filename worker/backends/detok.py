"""Token ids to text, incrementally, and stop strings; shared by the LM backends."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids (vLLM's prefix/read offsets).

    Byte-level BPE tokens can end inside a UTF-8 character; such text decodes to a
    trailing U+FFFD and is held back until a later token completes it, so the deltas
    concatenate to `decode(ids)`. Decoding a short window that starts a few tokens
    back (not the token alone) keeps tokenizers that strip leading spaces right.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """What is still held back (an incomplete character stays U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing new, or a character still incomplete (U+FFFD)
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text) :]


class ByteLevelDetokenizer:
    """The fast path for byte-level BPE vocabularies (GPT-2, Llama 3, the demo model).

    Each token is a fixed byte string, so text is an incremental UTF-8 decode of
    their concatenation: a few microseconds per token instead of two calls to
    `tokenizer.decode`, which matters at 32 streams per decode step. Incomplete
    characters are held back; at the end they become U+FFFD, as `decode` gives.
    """

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return str(self._utf8.decode(self._table[token_id]))

    def flush(self) -> str:
        return str(self._utf8.decode(b"", final=True))


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others
    map to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in alphabet):
        alphabet[b] = chr(256 + n)
    return alphabet


def _byte_table(tokenizer: Any) -> list[bytes] | None:
    """Bytes of every token id, or None when the vocabulary is not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    byte_of = {c: b for b, c in _byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids)
    added = {int(i) for i in tokenizer.added_tokens_decoder}
    table: list[bytes] = []
    for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        if tid in special:
            table.append(b"")  # skip_special_tokens=True
        elif tid in added or tok is None or any(c not in byte_of for c in tok):
            # Added tokens hold plain text, not byte-level symbols.
            table.append(tokenizer.decode([tid], skip_special_tokens=True).encode())
        else:
            table.append(bytes(byte_of[c] for c in tok))
    return table


def detokenizer_factory(tokenizer: Any) -> Callable[[], Detokenizer]:
    """A maker of per-request detokenizers for `tokenizer` (its fastest exact kind)."""
    table = _byte_table(tokenizer)
    if table is not None:
        return partial(ByteLevelDetokenizer, table)
    # No clean-up pass: it is not local, so deltas would not add up.
    decode = partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return partial(IncrementalDetokenizer, decode)


def _partial_stop_len(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class StopMatcher:
    """Cuts text before the first stop string; holds back what may begin one.

    Only held-back text is kept: released text never contains the start of a stop
    string (else it would have been held), so it need not be searched again.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return (text now safe to release, whether a stop string matched)."""
        if not self._stops:  # the common case, once per token per stream
            return delta, False
        text = self._held + delta
        hits = [i for s in self._stops if (i := text.find(s)) != -1]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        hold = max((_partial_stop_len(text, s) for s in self._stops), default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release held text: generation ended, so it can no longer become a stop string."""
        out, self._held = self._held, ""
        return out
