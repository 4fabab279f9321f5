"""Which layers each pipeline stage holds: contiguous ranges of decoder layers, the embedding on
the first stage and the LM head on the last."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..engine.config import ConfigError


@dataclass(frozen=True)
class StageSplit:
    """bounds[i]..bounds[i+1] are stage i's decoder layers (0-based); len(bounds) = stages + 1."""

    bounds: tuple[int, ...]

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    def decoders(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def held(self, stage: int) -> set[int]:
        """Scheduling layers of `stage` (0 = embedding, 1..L = decoders, L+1 = head)."""
        out = {l + 1 for l in self.decoders(stage)}
        if stage == 0:
            out.add(0)
        if stage == self.stages - 1:
            out.add(self.num_layers + 1)
        return out

    def describe(self) -> str:
        parts = []
        for s in range(self.stages):
            r = self.decoders(s)
            extra = (["embed"] if s == 0 else []) + (["head"] if s == self.stages - 1 else [])
            parts.append(f"stage {s}: layers {r.start}-{r.stop - 1}" + (f" + {' + '.join(extra)}" if extra else ""))
        return "; ".join(parts)

    @classmethod
    def from_bounds(cls, bounds: Sequence[int], num_layers: int, stages: int) -> "StageSplit":
        b = tuple(int(x) for x in bounds)
        if len(b) != stages + 1 or b[0] != 0 or b[-1] != num_layers or any(b[i] >= b[i + 1] for i in range(stages)):
            raise ConfigError(f"stage bounds {list(b)} must rise strictly from 0 to {num_layers} with {stages + 1} "
                              f"entries (every stage at least one decoder layer), e.g. "
                              f"{list(even_split(num_layers, stages).bounds)}")
        return cls(b)


def even_split(num_layers: int, stages: int) -> StageSplit:
    return balanced_split([1.0] * num_layers, 0.0, 0.0, stages)


def balanced_split(layer_cost: Sequence[float], embed_cost: float, head_cost: float, stages: int) -> StageSplit:
    """Contiguous split minimising the slowest stage's cost (the pipeline's beat), where stage 0 also
    pays `embed_cost` and the last stage `head_cost`. Exact (dynamic programming over boundaries)."""
    L = len(layer_cost)
    if stages < 1 or L < stages:
        raise ConfigError(f"{stages} stages need at least {stages} decoder layers; the model has {L}")
    prefix = [0.0]
    for c in layer_cost:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (embed_cost if s == 0 else 0.0) + (head_cost if s == stages - 1 else 0.0)

    inf = float("inf")
    # best[s][b]: the smallest max-stage cost placing decoders [0, b) on stages 0..s-1
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    arg = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for b in range(s, L - (stages - s) + 1):
            for a in range(s - 1, b):
                v = max(best[s - 1][a], cost(s - 1, a, b))
                if v < best[s][b] - 1e-12:
                    best[s][b], arg[s][b] = v, a
    bounds = [L]
    for s in range(stages, 0, -1):
        bounds.append(arg[s][bounds[-1]])
    return StageSplit(tuple(reversed(bounds)))
