"""The edge every call to a meshserve server passes: request context, errors -> status
with details, timing, telemetry hooks. One wrapper, applied once per handler when the
server is built (not a grpc.aio interceptor: see docs/architecture.md, "The edge", for
the measured cost of each).

A handler is `async def handler(request, call: Call) -> response` (or an async generator
for server streaming). It converts, calls one domain object and converts back; any
MeshError it lets out becomes the call's status here, with google.rpc.Status details.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from meshserve.errors import InvalidArgument, MeshError
from meshserve.metadata import (
    POLICY_KEY,
    REQUEST_ID_KEY,
    TRACEPARENT_KEY,
    TRACESTATE_KEY,
)
from meshserve.status import as_mesh_error, details_trailer, to_grpc_code

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Metadata = tuple[tuple[str, str | bytes], ...]

# Caller metadata the edge reads, in one pass per call.
_READ = frozenset({REQUEST_ID_KEY, POLICY_KEY, TRACEPARENT_KEY, TRACESTATE_KEY})

# Request ids for calls that bring none: 128 random bits as 32 hex digits, like
# uuid4().hex (an id, not a secret) at a tenth of its cost (no getrandom syscall).
_ids = random.Random()

# The call being served by this task, for log lines (see meshserve.logs).
current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "meshserve_call", default=None
)


class Call:
    """One call as the handler and the telemetry hooks see it. Built once per call."""

    __slots__ = (
        "_context",
        "_request_id",
        "_trailers",
        "first_at",
        "identity",
        "messages",
        "metadata",
        "method",
        "model",
        "span",
        "started",
        "worker_id",
    )

    def __init__(self, method: str, context: Any, metadata: dict[str, str]) -> None:
        self.method = method  # "Generate", "Infer", ...
        self.metadata = metadata  # the keys in _READ that the caller sent
        self._context = context
        self._request_id = metadata.get(REQUEST_ID_KEY, "")
        self._trailers: Metadata = ()
        self.identity: str | None = None  # the authenticated caller, once auth exists
        self.model = ""  # set by the handler once it knows
        self.worker_id = ""  # the gateway: the worker that served the call
        self.started = time.perf_counter()
        self.first_at = 0.0  # perf_counter of the first response message (streams)
        self.messages = 0  # response messages sent
        self.span: object | None = None  # the tracing hook's span, when it records

    @classmethod
    def from_context(cls, method: str, context: Any) -> Call:
        """A call with the caller's metadata read (in one pass: this is the per-call path)."""
        found: dict[str, str] = {}
        for item in context.invocation_metadata() or ():
            if item.key in _READ and item.key not in found:
                v = item.value
                found[item.key] = v.decode() if isinstance(v, bytes) else str(v)
        return cls(method, context, found)

    @property
    def request_id(self) -> str:
        rid = self._request_id
        if not rid:
            rid = self._request_id = f"{_ids.getrandbits(128):032x}"
        return rid

    @request_id.setter
    def request_id(self, value: str) -> None:
        if value:
            self._request_id = value

    def time_remaining(self) -> float | None:
        """Seconds to the caller's deadline (None: no deadline; never negative)."""
        remaining: float | None = self._context.time_remaining()
        return remaining

    def set_trailers(self, metadata: Metadata) -> None:
        """Trailing metadata for the response (kept on errors too)."""
        self._trailers = metadata
        self._context.set_trailing_metadata(metadata)

    @property
    def trailers(self) -> Metadata:
        return self._trailers


class EdgeHook(Protocol):
    """Telemetry at the edge (metrics, spans). `end` gets the status code's name and,
    for a failed call, the error as the caller sees it."""

    def begin(self, call: Call) -> None: ...

    def end(self, call: Call, code: str, error: MeshError | None) -> None: ...


Decoder = Callable[[bytes], Any]


class Edge:
    """Builds the grpc method handlers of one server from edge handlers."""

    def __init__(self, *, hooks: Sequence[EdgeHook] = ()) -> None:
        self._hooks = tuple(hooks)
        # The tasks of the calls being served (one add and one discard per call), so a
        # shutdown can end those still open at its grace limit with a status of its own
        # rather than grpc's generic "Cancelling all calls".
        self._open: set[asyncio.Task[Any]] = set()
        self._ending: dict[asyncio.Task[Any], MeshError] = {}

    @property
    def open_calls(self) -> int:
        return len(self._open)

    def end_open_calls(self, err: MeshError) -> int:
        """End every call still being served with `err` as its status (the handler is
        cancelled, so its cleanup stops the work it started); returns how many."""
        n = 0
        for task in list(self._open):
            if task.cancel():
                self._ending[task] = err
                n += 1
        return n

    def _begin(self, method: str, context: Any) -> Call:
        call = Call.from_context(method, context)
        current_call.set(call)
        if self._hooks:
            for hook in self._hooks:
                hook.begin(call)
        return call

    def _track(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._open.add(task)

    def _untrack(self, task: asyncio.Task[Any] | None) -> MeshError | None:
        """The call is done (or failing): no longer open. Returns the error it was
        ended with by `end_open_calls`, if it was. Called before any await on the way
        out, so a call is only ever cut while it waits in the handler."""
        if task is None:
            return None
        self._open.discard(task)
        err = self._ending.pop(task, None) if self._ending else None
        if err is not None:
            task.uncancel()  # handled here: the call goes on to send its status
        return err

    def _end(self, call: Call, code: str, error: MeshError | None = None) -> None:
        if not self._hooks:
            return
        for hook in self._hooks:
            try:
                hook.end(call, code, error)
            except Exception:  # telemetry must never fail a call
                log.exception("edge hook %r failed", hook)

    async def _abort(self, call: Call, context: Any, exc: Exception) -> None:
        err = as_mesh_error(exc)
        code = to_grpc_code(err.code)
        self._end(call, code.name, err)
        await context.abort(code, err.message, (*call.trailers, details_trailer(err)))

    def unary(
        self,
        method: str,
        fn: Callable[[Any, Call], Awaitable[Any]],
        *,
        decode: Decoder | None = None,
        response_serializer: Callable[[Any], bytes] | None = None,
    ) -> grpc.RpcMethodHandler:
        """A unary handler; with `decode`, the request bytes are decoded here (an
        undecodable request is INVALID_ARGUMENT, not an UNKNOWN with a traceback)."""

        async def behavior(request: Any, context: Any) -> Any:
            call = self._begin(method, context)
            task = asyncio.current_task()
            self._track(task)
            try:
                if decode is not None:
                    request = _decoded(decode, request, method)
                response = await fn(request, call)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                self._untrack(task)
                await self._abort(call, context, exc)
                raise  # not reached: abort raises
            except BaseException:  # cancelled: the client went away, or a shutdown
                if (err := self._untrack(task)) is not None:
                    await self._abort(call, context, err)
                self._end(call, "CANCELLED")
                raise
            finally:
                self._untrack(task)
            self._end(call, "OK")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behavior, response_serializer=response_serializer
        )

    def stream(
        self,
        method: str,
        fn: Callable[[Any, Call], AsyncIterator[Any]],
        *,
        decode: Decoder | None = None,
        response_serializer: Callable[[Any], bytes] | None = None,
    ) -> grpc.RpcMethodHandler:
        """A server-streaming handler (an async generator). The edge writes its messages
        itself (a coroutine behavior, context.write): grpc then iterates no generator of
        ours, one layer less per message than wrapping the handler's generator."""

        async def behavior(request: Any, context: Any) -> None:
            call = self._begin(method, context)
            task = asyncio.current_task()
            self._track(task)
            stream = None
            try:
                if decode is not None:
                    request = _decoded(decode, request, method)
                stream = fn(request, call)
                write = context.write
                async for msg in stream:
                    if not call.messages:
                        call.first_at = time.perf_counter()
                    call.messages += 1
                    await write(msg)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                self._untrack(task)
                await self._abort(call, context, exc)
            except BaseException:  # cancelled: the client went away, or a shutdown
                if (err := self._untrack(task)) is not None:
                    await self._abort(call, context, err)
                self._end(call, "CANCELLED")
                raise
            else:
                self._end(call, "OK")
            finally:
                self._untrack(task)
                if stream is not None:
                    # Close the handler's stream in this task, at once: its cleanup stops
                    # the work it started (a worker call, an engine request).
                    await stream.aclose()  # type: ignore[attr-defined]

        return grpc.unary_stream_rpc_method_handler(
            behavior, response_serializer=response_serializer
        )


def _decoded(decode: Decoder, payload: bytes, method: str) -> Any:
    try:
        return decode(payload)
    except DecodeError as exc:
        raise InvalidArgument(
            f"the {method} request could not be decoded as protobuf", field="request"
        ) from exc


def message_decoder(cls: type[Message]) -> Decoder:
    """`cls.FromString`, named for the edge's `decode=`."""
    return cls.FromString


def generic_handler(service: str, methods: dict[str, grpc.RpcMethodHandler]) -> Any:
    return grpc.method_handlers_generic_handler(service, methods)
