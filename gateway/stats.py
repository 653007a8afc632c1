"""What this gateway knows about each worker's load: in-band reports plus its own
accounting. Mechanism (it reads a clock); the scheduler sees only Candidates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from gateway.scheduler.types import Candidate
from meshserve.load import LoadSnapshot
from registry.records import WorkerRecord

# EWMA weight of a new sample: recent enough to follow a slowed worker within a few
# requests, smooth enough that one outlier does not swing routing.
ALPHA = 0.3
MAX_JUMP = 2.0


class WorkerStats:
    __slots__ = (
        "error_rate",
        "inflight",
        "kv_cache_use",
        "queue_depth",
        "report_at",
        "reported_inflight",
        "sent_since_report",
        "sent_total",
        "service_at",
        "service_time",
        "slots",
        "ttft",
    )

    def __init__(self) -> None:
        self.reported_inflight = 0
        self.queue_depth = 0
        self.kv_cache_use = 0.0
        self.slots = 0  # from reports; 0 until the first one
        self.report_at = 0.0
        self.sent_since_report = 0
        self.sent_total = 0  # attempts this gateway sent there (traffic share)
        self.inflight = 0  # this gateway's calls there now
        self.service_time: dict[str, float] = {}  # model -> seconds per unit of size
        self.service_at: dict[str, float] = {}  # model -> when service_time last changed
        self.ttft: dict[str, float] = {}
        self.error_rate = 0.0

    def on_send(self) -> None:
        self.inflight += 1
        self.sent_since_report += 1
        self.sent_total += 1

    def on_done(self, reported: bool = False) -> None:
        """A call of ours ended; `reported`: its trailer carried a fresh report
        (made after the call left the worker), which already excludes it."""
        self.inflight -= 1
        if reported:
            return
        if self.sent_since_report > 0:
            self.sent_since_report -= 1
        elif self.reported_inflight > 0:
            self.reported_inflight -= 1

    def on_report(self, report: LoadSnapshot, now: float) -> None:
        self.reported_inflight = report.inflight
        self.queue_depth = report.queue_depth
        self.kv_cache_use = report.kv_cache_use
        if report.slots:
            self.slots = report.slots
        self.report_at = now
        # The report counts everything the worker had admitted when it made it,
        # which includes what we sent so far.
        self.sent_since_report = 0

    def on_success(
        self, model: str, seconds: float, size: float, ttft: float | None, now: float
    ) -> None:
        self.service_at[model] = now
        per_unit = seconds / max(size, 1e-6)
        old = self.service_time.get(model)
        if old is None:
            self.service_time[model] = per_unit
        else:
            # One sample moves the estimate by at most ALPHA x (MAX_JUMP - 1): a stall
            # that inflates every call in flight must not mark a worker slow for long;
            # a worker that really slowed down keeps sending slow samples.
            self.service_time[model] = old + ALPHA * (min(per_unit, old * MAX_JUMP) - old)
        if ttft is not None:
            old_t = self.ttft.get(model)
            self.ttft[model] = ttft if old_t is None else old_t + ALPHA * (ttft - old_t)
        self.error_rate *= 1 - ALPHA

    def on_failure(self) -> None:
        self.error_rate += ALPHA * (1.0 - self.error_rate)


class Candidates(Sequence[Candidate]):
    """A lazy view: a Candidate is built only for the workers a policy looks at,
    so sampling policies stay O(sample) in large fleets."""

    __slots__ = ("_model", "_now", "_stats", "_workers", "worker_ids")

    def __init__(
        self,
        workers: Sequence[WorkerRecord],
        stats: Callable[[str], WorkerStats],
        model: str,
        now: float,
        worker_ids: tuple[str, ...] | None = None,
    ) -> None:
        self._workers = workers
        self._stats = stats
        self._model = model
        self._now = now
        # Affinity's ring cache checks the fleet by ids without building Candidates.
        self.worker_ids = (
            worker_ids if worker_ids is not None else tuple(w.worker_id for w in workers)
        )

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Candidate]:
        # Sequence's default __iter__ indexes until IndexError: an exception per pass,
        # and full-scan policies pass over the candidates on every call.
        for w in self._workers:
            yield self._build(w)

    def __getitem__(self, i: int) -> Candidate:  # type: ignore[override]
        return self._build(self._workers[i])

    def _build(self, w: WorkerRecord) -> Candidate:
        st = self._stats(w.worker_id)
        slots = st.slots
        if not slots:  # no report yet: the record's figure (a scan of its models)
            entry = w.model(self._model)
            slots = entry.max_concurrency if entry and entry.max_concurrency else 0
        return Candidate(
            worker_id=w.worker_id,
            slots=max(1, slots or w.capacity),
            reported_inflight=st.reported_inflight,
            sent_since_report=st.sent_since_report,
            gateway_inflight=st.inflight,
            queue_depth=st.queue_depth,
            service_time=st.service_time.get(self._model, 0.0),
            service_age=self._now - st.service_at.get(self._model, self._now),
            ttft=st.ttft.get(self._model, 0.0),
            kv_cache_use=st.kv_cache_use,
            error_rate=st.error_rate,
            report_age=self._now - st.report_at if st.report_at else 0.0,
            weight=_weight(w),
        )


_UNLIMITED = 1 << 62


def _max_sequence(w: WorkerRecord, model: str) -> int:
    entry = w.model(model)
    return entry.max_sequence_length if entry and entry.max_sequence_length else _UNLIMITED


def longest_fit(workers: Sequence[WorkerRecord], model: str) -> int:
    """The longest sequence (prompt + completion) every one of `workers` takes for `model`."""
    return min((_max_sequence(w, model) for w in workers), default=_UNLIMITED)


def fitting(workers: Sequence[WorkerRecord], model: str, tokens: int) -> list[WorkerRecord]:
    """The workers whose advertised sequence length (KV cache per sequence) fits `tokens`."""
    return [w for w in workers if _max_sequence(w, model) >= tokens]


def _weight(w: WorkerRecord) -> float:
    """The operator's static capacity weight (label `weight`), 1.0 when absent or bad."""
    raw = w.labels.get("weight")
    if raw is None:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        return 1.0
    return value if value > 0 else 1.0
