"""Scheduler tables: every policy, filter and scorer; affinity; determinism; stale load."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.scheduler import (
    LATENCY_CAPACITY_CONFIG,
    POLICY_NAMES,
    SCORERS,
    BoundedLoadAffinity,
    Candidate,
    ComposedPolicy,
    Policy,
    PolicyConfig,
    RequestFacts,
    build_policy,
    healthy,
    kv_headroom,
    least_inflight,
    predicted_completion,
    service_prior,
    stable_hash,
    with_affinity,
)
from gateway.scheduler.estimates import (
    SERVICE_HALF_LIFE,
    gateway_share,
    load_estimate,
    service_time,
)
from gateway.scheduler.pickers import RESAMPLE_ROUNDS

REQ = RequestFacts(model="m")
quick = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Short keyword names keep a table row on one line.
SHORT = dict(
    rep="reported_inflight", sent="sent_since_report", gw="gateway_inflight",
    st="service_time", kv="kv_cache_use", err="error_rate", w="weight",
)  # fmt: skip


def c(wid: str, slots: int = 1, **kw: float) -> Candidate:
    return Candidate(wid, slots, **{SHORT[k]: v for k, v in kw.items()})  # type: ignore[arg-type]


def rank(name: str, cands: Sequence[Candidate], seed: int = 0) -> list[str]:
    return build_policy(name).rank(REQ, cands, random.Random(seed))


# --- every shipped policy: a table of candidates -> expected primary -------------------

PRIMARY_TABLE = [
    # latency_capacity: predicted = s * max(1, (L + 1) / slots)
    ("latency_capacity", [c("a", st=1.0), c("b", st=2.0)], "a"),
    ("latency_capacity", [c("a", rep=3, st=1.0), c("b", st=2.0)], "b"),  # 4.0 vs 2.0
    ("latency_capacity", [c("a", 4, rep=3, st=1.0), c("b", 1, rep=1, st=1.0)], "a"),  # 1 vs 2
    ("latency_capacity", [c("a"), c("b", st=2.0), c("c", st=3.0)], "b"),  # prior: median 2.5
    ("latency_capacity", [c("a", w=4.0), c("b")], "a"),  # prior scaled by 1/weight
    ("latency_capacity", [c("a", sent=5, st=1.0), c("b", rep=3, st=1.0)], "b"),  # stale fix
    ("latency_capacity", [c("a", err=0.9), c("b", rep=2)], "b"),
    ("latency_capacity", [c("a", kv=0.99), c("b", rep=2)], "b"),
    ("least_inflight", [c("a", 4, gw=2), c("b", 1, gw=1)], "a"),  # per slot
    ("least_inflight", [c("a", gw=3, rep=0), c("b", gw=1, rep=9)], "b"),  # own in-flight only
    ("least_loaded_naive", [c("a", sent=10), c("b", rep=1)], "a"),  # blind to sends
    ("least_loaded_naive", [c("a", 1, rep=1), c("b", 4, rep=2)], "b"),  # per slot
    ("p2c", [c("a", 8, rep=3), c("b", 1, rep=2)], "b"),  # raw counts
    ("p2c", [c("a", rep=1, sent=3), c("b", rep=2)], "b"),  # stale-corrected
    ("weighted_round_robin", [c("a", 1), c("b", 3)], "b"),
]


@pytest.mark.parametrize(("name", "cands", "primary"), PRIMARY_TABLE)
def test_primary(name: str, cands: list[Candidate], primary: str) -> None:
    for seed in range(5):  # ties are random; these cases have none
        assert rank(name, cands, seed)[0] == primary


def test_filtered_workers_leave_the_ranking_unless_all_would() -> None:
    assert rank("latency_capacity", [c("a", err=0.9), c("b")]) == ["b"]
    both = rank("latency_capacity", [c("a", err=0.9), c("b", err=0.8)])
    assert sorted(both) == ["a", "b"]


def test_round_robin_rotates() -> None:
    policy, rng = build_policy("round_robin"), random.Random(0)
    fleet = [c("a"), c("b"), c("c")]
    assert [policy.rank(REQ, fleet, rng)[0] for _ in range(6)] == list("abcabc")
    assert policy.rank(REQ, fleet, rng) == ["a", "b", "c"]  # the rest follow in order


def test_weighted_round_robin_is_smooth_and_proportional() -> None:
    policy, rng = build_policy("weighted_round_robin"), random.Random(0)
    fleet = [c("a", 5), c("b", 1), c("c", 1)]
    picks = [policy.rank(REQ, fleet, rng)[0] for _ in range(7)]
    assert picks == list("aabacaa")  # nginx's interleaving, not aaaaabc
    counts = Counter(policy.rank(REQ, [c("x", 2, w=1.5), c("y", 1)], rng)[0] for _ in range(400))
    assert counts == {"x": 300, "y": 100}  # slots x weight = 3 : 1


def test_random_is_uniform_and_ties_are_broken_at_random() -> None:
    policy, rng = build_policy("random"), random.Random(3)
    counts = Counter(policy.rank(REQ, [c(w) for w in "abcd"], rng)[0] for _ in range(4000))
    assert all(800 < n < 1200 for n in counts.values())
    firsts = {rank("latency_capacity", [c(w) for w in "abcd"], seed)[0] for seed in range(40)}
    assert firsts == set("abcd")


def test_least_inflight_function_kept_for_the_router() -> None:
    assert least_inflight([c("a", 2, gw=3), c("b", 2, gw=0)], random.Random(0)) == ["b", "a"]
    assert least_inflight([c("z", 0, gw=1)], random.Random(0)) == ["z"]  # slots 0: as 1


# --- filters, scorers and the composed policy -------------------------------------------

FILTER_TABLE = [
    (healthy, [c("a", err=0.3), c("b", err=0.25)], ["b"]),
    (healthy, [c("a", err=0.3), c("b", err=1.0)], ["a", "b"]),  # never empty
    (kv_headroom, [c("a", kv=0.98), c("b", kv=0.97)], ["b"]),
    (kv_headroom, [c("a", kv=0.99)], ["a"]),
    (healthy, [], []),
]


@pytest.mark.parametrize(("filt", "cands", "kept"), FILTER_TABLE)
def test_filters(filt: object, cands: list[Candidate], kept: list[str]) -> None:
    assert callable(filt)
    assert [x.worker_id for x in filt(REQ, cands)] == kept


SCORE_TABLE = [
    ("expected_delay", [c("a", st=1.0), c("b", st=4.0)], [1.0, 0.25]),
    # 1 + 1.1 (full slots stretch service 10%) vs 1
    ("expected_delay", [c("a", 2, rep=3, st=1.0), c("b", st=1.0)], [1 / 2.1, 1.0]),
    ("queue", [c("a", 4, rep=1), c("b", 4, rep=6)], [0.75, 0.0]),
    ("load", [c("a", 2, rep=2), c("b", 1)], [0.5, 1.0]),
    ("kv_cache", [c("a", kv=0.25), c("b", kv=-0.5)], [0.75, 1.0]),
    ("errors", [c("a", err=0.1), c("b", err=1.5)], [0.9, 0.0]),  # clamped
]


@pytest.mark.parametrize(("scorer", "cands", "expected"), SCORE_TABLE)
def test_scorers(scorer: str, cands: list[Candidate], expected: list[float]) -> None:
    assert SCORERS[scorer](REQ, cands) == pytest.approx(expected)


def test_estimates() -> None:
    assert service_prior([c("a"), c("b")]) == 1.0
    assert service_prior([c("a", st=2.0, w=2.0), c("b")]) == 4.0
    # size_hint scales the request's own service, not the queue ahead of it; full slots
    # stretch that service by BATCH_SLOWDOWN
    busy = c("a", 2, rep=3, st=1.0)
    assert predicted_completion(busy, 1.0) == pytest.approx(1.0 + 1.1)
    assert predicted_completion(busy, 1.0, size_hint=3.0) == pytest.approx(1.0 + 3.3)
    # below full slots, the less loaded of two equal workers is preferred
    assert predicted_completion(c("a", 4, rep=1, st=1.0), 1.0) < predicted_completion(
        c("b", 4, rep=2, st=1.0), 1.0
    )
    # one gateway (own in-flight == estimate): share 1; a quarter: sends count 4x
    assert gateway_share([c("a", rep=2, gw=2)]) == gateway_share([c("a", rep=2)]) == 1.0
    quarter = c("a", rep=10, sent=2, gw=2)
    share = gateway_share([quarter])
    assert share == pytest.approx(3 / 13)
    assert load_estimate(quarter, share) == pytest.approx((10 + 4 * 13 / 3) / 2)  # see doc


def test_other_gateways_sends_are_estimated_from_this_gateways_share() -> None:
    one = [c("a", rep=2, sent=2, gw=4), c("b", rep=6, gw=6)]
    assert rank("latency_capacity", one)[0] == "a"  # 4 vs 6: exact with one gateway
    # Same counts, but we hold a quarter of the load: others sent ~3x our 2 sends to "a".
    many = [replace(one[0], gateway_inflight=2), replace(one[1], gateway_inflight=0)]
    assert rank("latency_capacity", many)[0] == "b"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filters": ("nope",)}, "unknown"),
        ({"scorers": {"nope": 1.0}}, "unknown"),
        ({"picker": "best"}, "picker"),
        ({"scorers": {"queue": 0.0}}, "weights"),
        ({"sample": 0}, "sample"),
    ],
)
def test_policy_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("fastest")


def test_composed_weighted_scorers() -> None:
    config = PolicyConfig(filters=(), scorers={"queue": 1.0, "kv_cache": 2.0}, picker="argmax")
    policy, fleet = build_policy(config), [c("a", 2, kv=0.9), c("b", 2, rep=1, kv=0.1)]
    assert isinstance(policy, ComposedPolicy)  # a: 1 + 2 * 0.1 = 1.2; b: 0.5 + 2 * 0.9 = 2.3
    assert policy.rank(REQ, fleet, random.Random(0)) == ["b", "a"]


candidate_lists = st.lists(
    st.builds(
        Candidate,
        worker_id=st.text("abcdefgh", min_size=1, max_size=3),
        slots=st.integers(0, 4),
        reported_inflight=st.integers(0, 9),
        sent_since_report=st.integers(0, 5),
        gateway_inflight=st.integers(0, 9),
        service_time=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
        service_age=st.sampled_from([0.0, 0.1, 1.0]),
        kv_cache_use=st.sampled_from([0.0, 0.5, 0.99, 1.2]),
        error_rate=st.sampled_from([0.0, 0.1, 0.5, -0.1]),
        weight=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    ),
    max_size=12,
    unique_by=lambda x: x.worker_id,
)


@quick
@given(candidate_lists, st.integers(0, 2**32))
def test_latency_capacity_is_expressible_as_config(cands: list[Candidate], seed: int) -> None:
    fast = build_policy("latency_capacity").rank(REQ, cands, random.Random(seed))
    composed = build_policy(LATENCY_CAPACITY_CONFIG).rank(REQ, cands, random.Random(seed))
    assert fast == composed


# --- properties of every policy --------------------------------------------------------

ALL = [*POLICY_NAMES, "composed", "affinity"]


def make(name: str) -> Policy:
    if name == "composed":
        return build_policy(PolicyConfig(scorers={"load": 1.0, "errors": 0.5}, picker="argmax"))
    if name == "affinity":
        return with_affinity(build_policy("latency_capacity"))
    return build_policy(name)


@quick
@given(candidate_lists, st.integers(0, 2**32), st.sampled_from(ALL), st.sampled_from(["", "s1"]))
def test_ranking_is_a_subset_primary_first(
    cands: list[Candidate], seed: int, name: str, session: str
) -> None:
    policy = make(name)
    ranked = policy.rank(RequestFacts("m", session_id=session), cands, random.Random(seed))
    ids = [x.worker_id for x in cands]
    assert len(set(ranked)) == len(ranked) and set(ranked) <= set(ids)
    assert bool(ranked) == bool(cands)
    full = name in ("weighted_round_robin", "least_inflight", "least_loaded_naive")
    if full or (name in ("round_robin", "random") and len(cands) <= 8):
        assert sorted(ranked) == sorted(ids)  # a full ranking


@quick
@given(candidate_lists, st.sampled_from(sorted(SCORERS)))
def test_scores_are_within_0_and_1(cands: list[Candidate], scorer: str) -> None:
    scores = SCORERS[scorer](RequestFacts("m", size_hint=0.0), cands)
    assert len(scores) == len(cands) and all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_a_seed(name: str) -> None:
    table = random.Random(11)
    fleets = [
        [
            c(f"w{i}", table.randint(1, 4), rep=table.randint(0, 8), st=table.choice([0, 1, 2]))
            for i in range(table.randint(1, 12))
        ]
        for _ in range(30)
    ]

    def run() -> list[list[str]]:
        policy, rng = make(name), random.Random(5)
        facts = [RequestFacts("m", session_id=f"s{i % 3}") for i in range(len(fleets))]
        return [policy.rank(f, fleet, rng) for f, fleet in zip(facts, fleets, strict=True)]

    assert run() == run()


class Lazy(Sequence[Candidate]):
    """A fleet that builds a Candidate only when indexed, and counts how many it built."""

    def __init__(self, n: int, bad: int = 0) -> None:
        self.n, self.bad, self.built = n, bad, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Candidate:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.built += 1
        return c(f"w{i}", 4, rep=i % 7, err=1.0 if i < self.bad else 0.0)


@pytest.mark.parametrize("name", ["latency_capacity", "p2c", "random", "round_robin"])
def test_sampling_policies_stay_o1_on_large_fleets(name: str) -> None:
    fleet, policy, rng = Lazy(1000), build_policy(name), random.Random(0)
    for _ in range(50):
        assert len(policy.rank(REQ, fleet, rng)) == 2  # the primary and one fallback
    assert fleet.built <= 50 * 2


def test_sampling_draws_again_when_the_sample_is_filtered_out() -> None:
    fleet, rng = Lazy(1000, bad=900), random.Random(1)  # 90% unhealthy
    policy = build_policy("latency_capacity")
    primaries = [policy.rank(REQ, fleet, rng)[0] for _ in range(300)]
    bad = sum(int(p[1:]) < 900 for p in primaries)  # expect 0.81 ** rounds: 53%, not 81%
    assert 300 * 0.40 < bad < 300 * 0.81**RESAMPLE_ROUNDS * 1.25
    assert fleet.built <= 300 * 2 * RESAMPLE_ROUNDS


# --- stale load: a burst between two reports -------------------------------------------


def burst(name: str, n: int = 12) -> Counter[str]:
    """n requests with no report in between; the gateway counts its own sends."""
    fleet = {w: c(w, rep=r, st=1.0) for w, r in zip("abcd", [0, 2, 2, 2], strict=True)}
    policy, rng, sent = build_policy(name), random.Random(0), Counter[str]()
    for _ in range(n):
        wid = policy.rank(REQ, list(fleet.values()), rng)[0]
        sent[wid] += 1
        x = fleet[wid]
        fleet[wid] = replace(
            x, sent_since_report=x.sent_since_report + 1, gateway_inflight=x.gateway_inflight + 1
        )
    return sent


def test_stale_reports_latency_capacity_spreads_a_burst_naive_herds() -> None:
    sent = burst("latency_capacity")
    assert set(sent) == set("abcd") and max(sent.values()) <= 5
    assert burst("least_loaded_naive") == {"a": 12}  # the stale report's lightest, 12 times


# --- affinity --------------------------------------------------------------------------


def fleet_of(n: int, **load: int) -> list[Candidate]:
    return [c(f"w{i}", 1, rep=load.get(f"w{i}", 0)) for i in range(n)]


def owner(policy: BoundedLoadAffinity, session: str, fleet: Sequence[Candidate]) -> str:
    return policy.rank(RequestFacts("m", session_id=session), fleet, random.Random(0))[0]


def test_affinity_same_session_same_worker_and_sessions_spread() -> None:
    policy, fleet = with_affinity(build_policy("latency_capacity")), fleet_of(8)
    owners = {s: owner(policy, f"s{s}", fleet) for s in range(400)}
    assert all(owner(policy, f"s{s}", fleet) == w for s, w in list(owners.items())[:50])
    assert all(n > 20 for n in Counter(owners.values()).values())  # 50 each if even
    assert policy.rebuilds == 1  # the ring is built once, not per request


def test_affinity_moves_off_an_overloaded_worker_and_back() -> None:
    policy = with_affinity(build_policy("latency_capacity"), c=1.25)
    home = owner(policy, "s", fleet_of(8))
    busy = fleet_of(8, **{home: 6})  # average (6 + 1) / 8; cap ceil(1.25 * 7 / 8) = 2
    assert owner(policy, "s", busy) != home
    assert owner(policy, "s", fleet_of(8)) == home
    sick = [replace(x, error_rate=0.9) if x.worker_id == home else x for x in fleet_of(8)]
    assert owner(policy, "s", sick) != home


def test_affinity_keeps_a_worker_with_a_free_slot() -> None:
    policy = with_affinity(build_policy("latency_capacity"))
    fleet = [c(f"w{i}", 4) for i in range(8)]
    home = owner(policy, "s", fleet)
    # 3 of 4 slots busy, the rest idle: far above 1.25x the average, but no queueing
    busy = [replace(x, reported_inflight=3) if x.worker_id == home else x for x in fleet]
    assert owner(policy, "s", busy) == home
    full = [replace(x, reported_inflight=4) if x.worker_id == home else x for x in fleet]
    assert owner(policy, "s", full) != home


def test_affinity_moves_minimally_when_a_worker_leaves() -> None:
    policy = with_affinity(build_policy("latency_capacity"))
    before = {s: owner(policy, f"s{s}", fleet_of(10)) for s in range(1000)}
    fresh = with_affinity(build_policy("latency_capacity"))  # a ring built without w9
    after = {s: owner(fresh, f"s{s}", fleet_of(9)) for s in range(1000)}
    moved = [s for s in before if before[s] != after[s]]
    assert all(before[s] == "w9" for s in moved)  # only the leaver's sessions move
    assert 0 < len(moved) < 200
    # A retry excludes a worker: it is hidden on the ring, which is not rebuilt.
    assert {s: owner(policy, f"s{s}", fleet_of(9)) for s in range(1000)} == after
    assert policy.rebuilds == 1
    owner(policy, "s1", fleet_of(11))  # a new worker joins: rebuilt
    assert policy.rebuilds == 2


def test_affinity_without_session_is_the_wrapped_policy() -> None:
    fleet = fleet_of(6, w2=3)
    inner = build_policy("latency_capacity").rank(REQ, fleet, random.Random(4))
    wrapped = with_affinity(build_policy("latency_capacity")).rank(REQ, fleet, random.Random(4))
    assert wrapped == inner
    with pytest.raises(ValueError):
        with_affinity(build_policy("random"), c=0.9)


def test_stable_hash_is_stable() -> None:
    # blake2b, not the per-process salted hash(): the same in every gateway replica
    assert stable_hash("session-1") == 0xAE49BD2CD463E7AC != stable_hash("session-2")


@pytest.mark.parametrize(
    ("age_half_lives", "expected"),
    [(0, 0.09), (1, 0.06), (2, 0.045), (50, 0.03)],
)
def test_an_estimate_nobody_refreshes_fades_to_the_fleets(
    age_half_lives: float, expected: float
) -> None:
    # Measured 3x the fleet (0.03 s per unit), then no traffic: the gap halves per half-life.
    c = Candidate("w", 4, service_time=0.09, service_age=age_half_lives * SERVICE_HALF_LIFE)
    assert service_time(c, prior=0.03) == pytest.approx(expected, abs=1e-6)


def test_a_worker_starved_by_one_bad_estimate_is_tried_again() -> None:
    policy = build_policy("latency_capacity")
    busy = [Candidate(f"w{i}", 4, reported_inflight=2, service_time=0.03) for i in range(2)]
    stuck = Candidate("stuck", 4, service_time=0.09)  # inflated by one stall, then idle
    rng = random.Random(0)
    assert policy.rank(REQ, [*busy, stuck], rng)[0] != "stuck"
    later = replace(stuck, service_age=10 * SERVICE_HALF_LIFE)
    assert policy.rank(REQ, [*busy, later], rng)[0] == "stuck"
