"""A small async client over the generated stubs (works against a gateway or a worker)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc
import numpy as np

from meshserve.grpc_server import new_channel
from meshserve.v1 import inference_pb2, inference_pb2_grpc


class MeshClient:
    def __init__(
        self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.target = target
        self.channel = new_channel(target, credentials=credentials)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        sampling = inference_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop))
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        if top_k is not None:
            sampling.top_k = top_k
        if seed is not None:
            sampling.seed = seed
        req = inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling)
        call = self.stub.Generate(req, timeout=timeout)
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    async def embed(
        self, model: str, texts: Sequence[str], *, timeout: float | None = None
    ) -> np.ndarray:
        """Embeddings of `texts` as a float32 array of shape (len(texts), dim)."""
        req = inference_pb2.InferRequest(
            model=model,
            inputs=[
                inference_pb2.Tensor(
                    name="text",
                    dtype=inference_pb2.DATA_TYPE_STRING,
                    shape=[len(texts)],
                    string_contents=list(texts),
                )
            ],
        )
        resp = await self.stub.Infer(req, timeout=timeout)
        out = resp.outputs[0]
        return np.frombuffer(out.raw_contents, dtype="<f4").reshape(tuple(out.shape))

    async def list_models(
        self, model: str = "", *, timeout: float | None = None
    ) -> inference_pb2.ListModelsResponse:
        resp: inference_pb2.ListModelsResponse = await self.stub.ListModels(
            inference_pb2.ListModelsRequest(model=model), timeout=timeout
        )
        return resp
