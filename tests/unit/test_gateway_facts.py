"""What the gateway reads from a call (one pass over its metadata) and forwards."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.servicer import GatewayServicer
from meshserve.v1 import inference_pb2
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


class Router:
    def __init__(self, aliases: dict[str, AliasRecord]) -> None:
        self.aliases = aliases

    def resolve(self, model: str) -> str:
        alias = self.aliases.get(model)
        return model if alias is None else alias.targets[0][0]


def _servicer(**aliases: AliasRecord) -> GatewayServicer:
    return GatewayServicer(Router(aliases), view=None)  # type: ignore[arg-type]


def test_request_id_policy_and_trace_context_come_from_metadata() -> None:
    ctx = Ctx(
        ("user-agent", "x"),
        ("x-request-id", "rid-1"),
        ("x-meshserve-policy", "p2c"),
        ("traceparent", "00-abc-def-01"),
    )
    facts, payload, forward = _servicer()._facts("m", "", ctx, b"p")
    assert (facts.model, facts.request_id, facts.policy) == ("m", "rid-1", "p2c")
    assert payload == b"p"
    assert forward == (("x-request-id", "rid-1"), ("traceparent", "00-abc-def-01"))


def test_request_field_wins_over_metadata_and_an_id_is_made_when_missing() -> None:
    facts, _, forward = _servicer()._facts("m", "own", Ctx(("x-request-id", "md")), b"")
    assert facts.request_id == "own" and forward == (("x-request-id", "own"),)
    facts, _, _ = _servicer()._facts("m", "", Ctx(), b"")
    assert len(facts.request_id) == 32 and facts.policy == ""


def test_alias_is_resolved_by_appending_the_model_field() -> None:
    req = inference_pb2.GenerateRequest(model="chat", prompt="hi")
    servicer = _servicer(chat=AliasRecord("chat", (("llama-v2", 1.0),)))
    facts, payload, _ = servicer._facts("chat", "", Ctx(), req.SerializeToString())
    assert facts.model == "llama-v2"
    back = inference_pb2.GenerateRequest.FromString(payload)
    assert (back.model, back.prompt) == ("llama-v2", "hi")
