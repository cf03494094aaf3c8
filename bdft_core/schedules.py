"""Learning-rate schedules as data: each maps a step to a learning rate and can list all its values
(for plotting a schedule before anything runs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError


class Schedule:
    name = ""

    def lr(self, step: int, total: int) -> float:
        raise NotImplementedError

    def values(self, total: int) -> list[float]:
        """The learning rate at every step 0..total-1."""
        return [self.lr(i, total) for i in range(total)]

    def config(self) -> dict:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class Constant(Schedule):
    value: float = 0.01
    name = "constant"

    def lr(self, step, total):
        return self.value


@dataclass
class WarmupLinear(Schedule):
    """Linear warm-up from ``start * peak`` to ``peak`` over ``warmup`` of the steps, then linear
    decay to ``end * peak`` (the one-cycle shape fast CIFAR training uses)."""

    peak: float = 0.1
    warmup: float = 0.2
    start: float = 0.1
    end: float = 0.0
    name = "warmup_linear"

    def lr(self, step, total):
        t = step / max(1, total - 1)
        if t < self.warmup:
            return self.peak * (self.start + (1 - self.start) * t / self.warmup)
        return self.peak * (1 - (1 - self.end) * (t - self.warmup) / max(1e-9, 1 - self.warmup))


def triangle(u: float) -> float:
    """One triangular cycle on u in [0, 1): 0 -> 1 at the middle -> 0."""
    u = u % 1.0
    return 1.0 - abs(2.0 * u - 1.0)


@dataclass
class SuperFineTuning(Schedule):
    """Super-fine-tuning (Sha et al. 2022, "Fine-Tuning Is All You Need to Mitigate Backdoor
    Attacks", arXiv:2212.09067): two phases of a cyclic (triangular) learning rate that rises
    linearly from ``base`` to a maximum and falls back. Phase 1 (the first ``phase1`` of the steps)
    uses the large maximum ``max1`` to knock the model out of the backdoor's basin; phase 2 uses the
    small ``max2`` to settle back to high clean accuracy. ``cycles`` triangles per phase."""

    base: float = 3e-4
    max1: float = 0.1
    max2: float = 0.001
    phase1: float = 0.4
    cycles: int = 1
    name = "sft"

    def __post_init__(self):
        if not (0 < self.base <= self.max2 and self.base <= self.max1):
            raise ConfigError(f"SFT needs 0 < base ({self.base}) <= each maximum (max1 {self.max1}, max2 {self.max2})")
        if not 0.0 < self.phase1 < 1.0:
            raise ConfigError(f"SFT phase-1 share must be strictly between 0 and 1, got {self.phase1}")
        if int(self.cycles) < 1:
            raise ConfigError(f"SFT needs at least one cycle per phase, got {self.cycles}")

    def lr(self, step, total):
        n1 = max(1, round(self.phase1 * total))
        if step < n1:
            u, top = self.cycles * step / n1, self.max1
        else:
            u, top = self.cycles * (step - n1) / max(1, total - n1), self.max2
        return self.base + (top - self.base) * triangle(u)


SCHEDULES = {"constant": Constant, "warmup_linear": WarmupLinear, "sft": SuperFineTuning}
