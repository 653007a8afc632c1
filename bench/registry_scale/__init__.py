"""The etcd registry at scale: 1,000 leased workers, 4 watching gateways, a real etcd.

    python -m bench.registry_scale            # 1,000 workers, 4 gateways, TTL 3 s, 3 runs
    python -m bench.registry_scale --quick    # 100 workers, 1 run
    ... --etcd-no-fsync / --conn-per-worker   # diagnosis: the disk's share / real fan-in

Every simulated worker is its own `EtcdRegistry` (own channel, own lease, own
keep-alive task), exactly as a worker process runs it. They live in `--hosts`
child processes (250 each by default) so that half of them can die at once by
SIGKILL, the most abrupt failure there is. Each gateway is a fresh child process
with its own `EtcdRegistry` + `RegistryView`, so its cold start, RSS and CPU are
its own. Children (children.py) talk JSON lines over stdout and take commands on
stdin; timestamps are `time.monotonic_ns()`, one CLOCK_MONOTONIC for every process.

Phases: hosts register all workers -> gateways cold-start one after another
(list + watch with every worker present; RSS and tracemalloc) -> probe rounds
(one worker registers or deregisters every `--probe-interval`; latency from the
call to each gateway's listener) -> SIGKILL the hosts of half the workers and
time their disappearance at every gateway -> hold, then check that no gateway
ever deleted a worker that was alive. Each run starts a fresh etcd; the table
shows the median over runs (the max for the eviction count).

Modules: config (knobs, targets, records), children (the child roles), scenario (the
phases, raw records), analyze (raw records -> figures, pure), verdicts (targets over
runs, details), gauges (memory, CPU, stalls, etcd's disk), __main__ (the command).
"""

from bench.registry_scale.config import Config, make_record, worker_id
from bench.registry_scale.scenario import run_scenario

__all__ = ["Config", "make_record", "run_scenario", "worker_id"]
