"""The scenario's knobs, its targets, and the records the simulated workers register."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from meshserve.vocab import Device, ModelKind, ModelState
from registry.records import ModelEntry, WorkerRecord, encode

CANARY = "canary-"  # a gateway's own probe record, used to time its first watch
PROBE = "probe-"
NS = 1_000_000_000

# The registry's targets; a killed worker must be gone within TTL + MASS_FAILURE_SLACK_S.
TARGET_PROPAGATION_P99_MS = 100.0
TARGET_COLD_START_MS = 1000.0
TARGET_MEMORY_MB_PER_1000 = 20.0
MASS_FAILURE_SLACK_S = 2.0


@dataclass(frozen=True)
class Config:
    workers: int = 1000
    gateways: int = 4
    ttl: int = 3
    hosts: int = 4  # worker-host processes; the first half of them is killed
    probe_rounds: int = 3
    probes: int = 50  # registrations, then as many deregistrations, per round
    probe_interval_s: float = 0.05
    hold_s: float | None = None  # observation after the mass failure; None: 2 * ttl
    # gRPC shares one TCP connection among a process's channels to the same target, so
    # by default etcd sees one connection per host; True gives each worker its own.
    conn_per_worker: bool = False

    def __post_init__(self) -> None:
        if self.hosts < 2 or self.hosts % 2:
            raise ValueError("--hosts must be even and >= 2 (half of them are killed)")
        if self.workers < self.hosts:
            raise ValueError("need at least one worker per host")
        if self.gateways < 1 or self.ttl < 1:
            raise ValueError("need >= 1 gateway and ttl >= 1")

    @property
    def hold(self) -> float:
        return 2.0 * self.ttl if self.hold_s is None else self.hold_s

    def host_slices(self) -> list[tuple[int, int]]:
        """(first worker index, count) per host, as even as possible."""
        base, extra = divmod(self.workers, self.hosts)
        slices, first = [], 0
        for h in range(self.hosts):
            count = base + (1 if h < extra else 0)
            slices.append((first, count))
            first += count
        return slices

    def worker_ids(self, *, killed: bool) -> set[str]:
        """The workers on the hosts that are killed (the first half), or on the others."""
        half = self.hosts // 2
        slices = self.host_slices()[:half] if killed else self.host_slices()[half:]
        return {worker_id(first + i) for first, count in slices for i in range(count)}


def worker_id(index: int) -> str:
    return f"w{index:05d}"


def make_record(wid: str, index: int) -> WorkerRecord:
    """A representative record: a GPU worker serving two models, with labels."""
    return WorkerRecord(
        worker_id=wid,
        address=f"10.0.{index // 250}.{index % 250}:50051",
        device=Device("cuda", index % 8, "NVIDIA H100 80GB HBM3", 80 * 2**30),
        models=(
            ModelEntry("llama-3.1-8b-instruct", ModelKind.GENERATE, ModelState.READY,
                       "vllm", max_concurrency=64),
            ModelEntry("all-minilm-l6-v2", ModelKind.INFER, ModelState.READY,
                       "torch", max_concurrency=32),
        ),
        capacity=64,
        version="0.1.0",
        start_time=datetime(2025, 1, 1, tzinfo=UTC),
        labels={"zone": f"zone-{index % 3}", "node": f"node-{index // 8:04d}"},
    )  # fmt: skip


def record_bytes() -> int:
    """Encoded size of one record, as etcd stores it."""
    return len(encode(make_record(worker_id(0), 0)))
