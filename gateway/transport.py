"""What the router needs from a transport to workers: declared here, by the consumer.

The router imports no grpc: a transport returns a `CallHandle` whose failures are
already MeshErrors (translated where they enter, in the forwarder), so the same dispatch
loop serves a unary and a streaming call, and tests drive it with an in-memory fake.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Sequence
from typing import Protocol

from meshserve.errors import MeshError
from registry.records import WorkerRecord

Metadata = tuple[tuple[str, str], ...]
Trailers = Sequence[tuple[str, str | bytes]]


class Method(enum.Enum):
    GENERATE = "Generate"  # server streaming
    INFER = "Infer"  # unary: one response message


class CallHandle(Protocol):
    """One call in flight on one worker."""

    worker_id: str

    async def read(self) -> bytes | None:
        """The next response message; None once the call ended well. Raises MeshError."""
        ...

    def raw_read(self) -> Awaitable[object]:
        """The next message (bytes) or `end`, for the relay's hot loop: no coroutine of
        the transport's per message; a failure raises the transport's own exception,
        which `translate` maps (a stream relays thousands of messages per second)."""
        ...

    @property
    def end(self) -> object:
        """What `raw_read` returns once the call ended well."""
        ...

    def translate(self, exc: Exception) -> MeshError | None:
        """A failure `raw_read` raised, as a MeshError (None: not the transport's)."""
        ...

    def trailers(self) -> Awaitable[Trailers]:
        """The call's trailing metadata (after `read` returned None)."""
        ...

    def cancel(self) -> None:
        """Stop the call (a no-op once it ended): the worker stops its work."""
        ...


class Transport(Protocol):
    def call(
        self,
        method: Method,
        worker: WorkerRecord,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> CallHandle: ...


FOLD_AFTER = 256  # relayed messages kept before a `Resumable` folds them into one


class Resumable(Protocol):
    """What a stream migration needs from the protobuf edge (gateway/resume.py)."""

    def delivered(self, messages: list[bytes]) -> tuple[list[int], bool]:
        """The token ids in the relayed `messages`, and whether the last one (with
        the finish reason) is among them."""
        ...

    def fold(self, messages: list[bytes]) -> bytes:
        """`messages` as one, keeping only what `delivered` reads."""
        ...

    def payload(self, token_ids: list[int], resumed: int) -> bytes:
        """The request that resumes the stream after `token_ids` (`resumed` times)."""
        ...
