"""Model aliases: one served name splitting traffic over model versions by weight.

Stored in etcd under /meshserve/v1/aliases/<name> (protobuf ModelAlias), watched by
every gateway with the worker records, so a split changes at run time everywhere.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from meshserve.errors import InvalidArgument
from meshserve.v1 import registry_pb2
from registry.keys import valid_worker_id


@dataclass(frozen=True)
class AliasRecord:
    name: str
    targets: tuple[tuple[str, float], ...]  # (model, weight > 0)

    def __post_init__(self) -> None:
        if not valid_worker_id(self.name):
            raise InvalidArgument(f"invalid alias name {self.name!r}")
        if not self.targets:
            raise InvalidArgument(f"alias {self.name!r} needs at least one target")
        for model, weight in self.targets:
            if not valid_worker_id(model):
                raise InvalidArgument(f"alias {self.name!r}: invalid target model {model!r}")
            if model == self.name:
                raise InvalidArgument(f"alias {self.name!r} cannot target itself")
            if not weight > 0:
                raise InvalidArgument(f"alias {self.name!r}: weight of {model!r} must be > 0")

    def pick(self, rng: random.Random) -> str:
        """A target drawn with probability weight / total."""
        if len(self.targets) == 1:
            return self.targets[0][0]
        cumulative = list(itertools.accumulate(w for _, w in self.targets))
        i = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self.targets[min(i, len(self.targets) - 1)][0]


def encode(alias: AliasRecord) -> bytes:
    pb = registry_pb2.ModelAlias(
        name=alias.name,
        targets=[registry_pb2.AliasTarget(model=m, weight=w) for m, w in alias.targets],
    )
    return pb.SerializeToString(deterministic=True)


def decode(data: bytes) -> AliasRecord:
    """Raises ValueError (undecodable) or InvalidArgument (invalid alias)."""
    try:
        pb = registry_pb2.ModelAlias.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"undecodable alias: {exc}") from exc
    return AliasRecord(pb.name, tuple((t.model, t.weight) for t in pb.targets))


def parse_targets(items: list[str]) -> tuple[tuple[str, float], ...]:
    """`MODEL=WEIGHT` strings (weight defaults to 1) from the command line."""
    out = []
    for item in items:
        model, _, weight = item.partition("=")
        try:
            out.append((model.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise InvalidArgument(f"bad target {item!r}: use MODEL=WEIGHT") from None
    return tuple(out)
