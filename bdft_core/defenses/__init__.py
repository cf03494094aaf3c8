"""Defense registry: name -> class. Adding a defense is one file, one entry here, one test."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Defense
from .fine_pruning import FinePruning
from .ft import FineTuning
from .fst import FeatureShiftTuning
from .ft_sam import FineTuningSAM
from .sft import SuperFineTuning

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (FineTuning, SuperFineTuning, FinePruning, FineTuningSAM,
                                                          FeatureShiftTuning)}


def defense_names() -> list[str]:
    return list(DEFENSES)


def build_defense(name: str, **params) -> Defense:
    key = str(name).strip().lower()
    if key not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}: choose one of {', '.join(DEFENSES)}")
    return DEFENSES[key](**params)


__all__ = ["DEFENSES", "Defense", "FeatureShiftTuning", "FinePruning", "FineTuning", "FineTuningSAM", "SuperFineTuning", "build_defense", "defense_names"]
