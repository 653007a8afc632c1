"""route-explain's pure parts: the explanation of a ranking, and the traffic meter."""

from __future__ import annotations

import random

from gateway.fleet import TrafficMeter
from gateway.scheduler import Candidate, RequestFacts, build_policy
from gateway.scheduler.explain import explain


def _c(wid: str, inflight: int = 0, **kw: float) -> Candidate:
    return Candidate(wid, slots=4, reported_inflight=inflight, service_time=0.01, **kw)  # type: ignore[arg-type]


def test_explanations_follow_the_policys_ranking_and_say_why() -> None:
    cands = [_c("busy", 8), _c("idle", 0), _c("failing", 0, error_rate=0.9)]
    policy = build_policy("latency_capacity")
    out = explain(policy, RequestFacts("m"), cands, random.Random(0))
    by_id = {e.worker_id: e for e in out}
    assert out[0].worker_id == "idle" and out[0].rank == 0
    assert by_id["failing"].filtered_by == "healthy"
    assert by_id["busy"].predicted_completion_s > by_id["idle"].predicted_completion_s
    assert by_id["busy"].inputs["reported_inflight"] == 8.0
    assert by_id["idle"].scores["queue"] == 1.0 and by_id["busy"].scores["queue"] == 0.0


def test_explaining_does_not_move_a_policys_state() -> None:
    policy = build_policy("round_robin")
    cands = [_c("a"), _c("b")]
    picks = [explain(policy, RequestFacts("m"), cands, random.Random(0))[0].worker_id
             for _ in range(3)]  # fmt: skip
    assert len(set(picks)) == 1
    assert policy.rank(RequestFacts("m"), cands, random.Random(0))[0] == picks[0]


def test_traffic_share_over_the_recent_window() -> None:
    now = [0.0]
    meter = TrafficMeter(window_s=10.0, clock=lambda: now[0])
    assert meter.shares({"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}  # since the start
    now[0] = 1.0
    assert meter.shares({"a": 3, "b": 5}) == {"a": 0.0, "b": 1.0}  # the last second
    now[0] = 30.0  # old samples age out: the window starts at the latest one before it
    assert meter.shares({"a": 13, "b": 5}) == {"a": 1.0, "b": 0.0}
