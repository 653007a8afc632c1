"""A mixed load (unary Infer and streaming Generate) against a gateway, recording how
every call ended, for the fault-injection suite."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from meshserve.metadata import POLICY_KEY, WORKER_ID_KEY
from meshserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, registry_pb2
from worker.backends.fake import token_id

DEADLINE_S = 10.0
STREAM_TOKENS = 40


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "unary" | "stream"
    started: float
    ended: float
    code: str  # "OK" or the status code's name
    worker: str  # the worker that served it, when known
    tokens: int = 0  # messages received (streams)
    resumed: int = 0  # times the stream moved to another worker (its last message says)
    exact: bool = True  # streams: exactly the tokens of an unbroken run, none twice


@dataclass
class MixedLoad:
    target: str
    unary: int = 4
    streams: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> MixedLoad:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._tasks = [asyncio.create_task(self._unary(stub)) for _ in range(self.unary)]
        self._tasks += [asyncio.create_task(self._stream(stub)) for _ in range(self.streams)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._channel is not None:
            await self._channel.close()

    async def _unary(self, stub: inference_pb2_grpc.InferenceStub) -> None:
        x = inference_pb2.Tensor(
            name="x", dtype=inference_pb2.DATA_TYPE_INT8, shape=[1], raw_contents=b"\x01"
        )
        req = inference_pb2.InferRequest(model="echo", inputs=[x])
        while not self._stop.is_set():
            t = time.monotonic()
            call = stub.Infer(req, timeout=DEADLINE_S)
            try:
                await call
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            self._record(Outcome("unary", t, time.monotonic(), code, await _wid(call)))

    async def _stream(self, stub: inference_pb2_grpc.InferenceStub) -> None:
        rng = random.Random(len(self._tasks))
        while not self._stop.is_set():
            self._record(await _one_stream(stub, rng.getrandbits(32), STREAM_TOKENS))

    async def spread_streams(self, n: int, tokens: int) -> list[asyncio.Task[Outcome]]:
        """Open `n` long streams one after another with the round_robin policy, each
        delivering before the next opens, so that on n workers each has one open; the
        tasks end with their outcomes (recorded with the load's)."""
        assert self._channel is not None
        stub = inference_pb2_grpc.InferenceStub(self._channel)
        tasks = []
        for i in range(n):
            first = asyncio.Event()
            tasks.append(asyncio.create_task(self._spread(stub, 1000 + i, tokens, first)))
            self._tasks.append(tasks[-1])  # awaited on the way out, whatever happens
            await asyncio.wait_for(first.wait(), DEADLINE_S)
        return tasks

    async def _spread(
        self, stub: inference_pb2_grpc.InferenceStub, seed: int, tokens: int, first: asyncio.Event
    ) -> Outcome:
        out = await _one_stream(stub, seed, tokens, first=first, policy="round_robin")
        first.set()  # also when it failed before its first message
        self._record(out)
        return out

    def _record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._progress.set()

    def failed(self, kind: str, since: float = 0.0) -> Counter[str]:
        return Counter(
            o.code
            for o in self.outcomes
            if o.kind == kind and o.code != "OK" and o.started >= since
        )

    def served(self, kind: str, worker: str, since: float) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind and o.worker == worker
                   and o.started >= since and o.code == "OK")  # fmt: skip

    def resumed(self) -> int:
        """Streams that moved to another worker and ended well."""
        return sum(1 for o in self.outcomes if o.resumed and o.code == "OK")

    def inexact(self) -> int:
        """Streams that ended well but with a token missing, extra or out of place."""
        return sum(1 for o in self.outcomes if not o.exact)

    def ok(self, kind: str, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind and o.code == "OK"
                   and o.started >= since)  # fmt: skip

    async def wait_ok(self, n: int, timeout_s: float = 20.0) -> None:
        """Until `n` more calls of each kind succeeded (the load is flowing)."""
        base = (self.ok("unary"), self.ok("stream"))
        async with asyncio.timeout(timeout_s):
            while self.ok("unary") < base[0] + n or self.ok("stream") < base[1] + n:
                self._progress.clear()
                await self._progress.wait()


async def _one_stream(
    stub: inference_pb2_grpc.InferenceStub,
    seed: int,
    tokens: int,
    *,
    first: asyncio.Event | None = None,
    policy: str = "",
) -> Outcome:
    """One seeded stream to its end. Seeded: the FakeBackend's tokens are a function of
    (seed, position), so the unbroken stream's tokens are known without running it."""
    req = inference_pb2.GenerateRequest(
        model="gen",
        prompt="x",
        sampling=inference_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, seed=seed),
    )
    md = ((POLICY_KEY, policy),) if policy else None
    t = time.monotonic()
    call = stub.Generate(req, timeout=DEADLINE_S, metadata=md)
    n, ids, resumed = 0, [], 0
    try:
        async for msg in call:
            n += 1
            ids.extend(msg.token_ids)
            resumed = msg.resumed or resumed
            if first is not None:
                first.set()
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    exact = code != "OK" or ids == [token_id(seed, i) for i in range(tokens)]
    return Outcome("stream", t, time.monotonic(), code, await _wid(call), n, resumed, exact)


async def _wid(call: grpc.aio.Call) -> str:
    try:
        md = dict(await call.trailing_metadata() or ())
    except grpc.aio.AioRpcError:
        return ""
    return str(md.get(WORKER_ID_KEY, ""))


async def wait_in_view(gateway: str, worker: str, address: str, timeout_s: float = 30.0) -> None:
    """Until the gateway's view has `worker` SERVING at `address` (Admin.ListWorkers)."""
    async with asyncio.timeout(timeout_s), grpc.aio.insecure_channel(gateway) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        while True:
            resp = await stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5)
            if any(
                w.worker_id == worker
                and w.address == address
                and w.state == registry_pb2.WORKER_STATE_SERVING
                for w in resp.workers
            ):
                return
            await asyncio.sleep(0.05)  # another process's view: no event to await here
