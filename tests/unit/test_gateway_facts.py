"""What the gateway reads from a call (one pass over its metadata) and forwards."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway import convert
from meshserve.edge import Call
from meshserve.errors import InvalidArgument
from meshserve.v1 import inference_pb2, types_pb2
from registry.aliases import AliasRecord


@dataclass
class Item:
    key: str
    value: str | bytes


class Ctx:
    def __init__(self, *md: tuple[str, str | bytes]) -> None:
        self._md = [Item(k, v) for k, v in md]

    def invocation_metadata(self) -> list[Item]:
        return self._md


def _resolver(**aliases: AliasRecord) -> convert.Resolve:
    def resolve(model: str) -> str:
        alias = aliases.get(model)
        return model if alias is None else alias.targets[0][0]

    return resolve


def _gen(model: str = "m", request_id: str = "", **kw: object) -> bytes:
    req = inference_pb2.GenerateRequest(model=model, request_id=request_id, **kw)  # type: ignore[arg-type]
    return req.SerializeToString()


def test_request_id_policy_and_trace_context_come_from_metadata() -> None:
    call = Call.from_context(
        "Generate",
        Ctx(
            ("user-agent", "x"),
            ("x-request-id", "rid-1"),
            ("x-meshserve-policy", "p2c"),
            ("traceparent", "00-abc-def-01"),
        ),
    )
    facts, payload, _ = convert.generate_facts(_gen(), call, _resolver())
    assert (facts.model, facts.request_id, facts.policy) == ("m", "rid-1", "p2c")
    assert payload == _gen()
    assert convert.forward_metadata(call) == (
        ("x-request-id", "rid-1"),
        ("traceparent", "00-abc-def-01"),
    )


def test_request_field_wins_over_metadata_and_an_id_is_made_when_missing() -> None:
    call = Call.from_context("Generate", Ctx(("x-request-id", "md")))
    facts, _, _ = convert.generate_facts(_gen(request_id="own"), call, _resolver())
    assert facts.request_id == "own"
    assert convert.forward_metadata(call) == (("x-request-id", "own"),)
    call = Call.from_context("Infer", Ctx())
    facts, _ = convert.infer_facts(
        inference_pb2.InferRequest(model="m").SerializeToString(), call, _resolver()
    )
    assert len(facts.request_id) == 32 and facts.policy == ""


def test_routing_facts_of_a_generate_request() -> None:
    call = Call.from_context("Generate", Ctx())
    payload = _gen(
        session_id="s1",
        priority=types_pb2.PRIORITY_HIGH,
        prompt_token_ids=[1, 2, 3],
        sampling=inference_pb2.SamplingParams(max_tokens=64),
    )
    facts, _, _ = convert.generate_facts(payload, call, _resolver())
    assert (facts.session_id, facts.priority) == ("s1", 1)
    assert facts.size_hint == 4.0 and facts.min_tokens == 64 + 3
    assert call.model == "m"


def test_alias_is_resolved_by_appending_the_model_field() -> None:
    call = Call.from_context("Generate", Ctx())
    resolve = _resolver(chat=AliasRecord("chat", (("llama-v2", 1.0),)))
    facts, payload, _ = convert.generate_facts(_gen("chat", prompt="hi"), call, resolve)
    assert facts.model == "llama-v2" and call.model == "llama-v2"
    back = inference_pb2.GenerateRequest.FromString(payload)
    assert (back.model, back.prompt) == ("llama-v2", "hi")


def test_bad_requests_name_the_field() -> None:
    call = Call.from_context("Generate", Ctx())
    with pytest.raises(InvalidArgument) as info:
        convert.generate_facts(b"\xff\xff\xff", call, _resolver())
    assert info.value.violations[0].field == "request"
    with pytest.raises(InvalidArgument) as info:
        convert.generate_facts(_gen(model=""), call, _resolver())
    assert info.value.violations[0].field == "model"
