"""Defense registry: name -> class. Adding a defense is one file, one entry here, one test."""
from __future__ import annotations

from ..errors import ConfigError
from .abl import ABL
from .activation_clustering import ActivationClustering
from .anp import ANP
from .base import Defense, PoisonedTraining
from .fine_pruning import FinePruning
from .fst import FeatureShiftTuning
from .ft import FineTuning
from .ft_sam import FineTuningSAM
from .ibau import IBAU
from .nad import NAD
from .neural_cleanse import NeuralCleanse
from .sft import SuperFineTuning
from .spectral_signatures import SpectralSignatures

# table order: the paper's subjects, the baselines it compares against, then the newer ones
DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (
    FineTuning, SuperFineTuning, FinePruning, NAD, NeuralCleanse, ABL, ActivationClustering, SpectralSignatures,
    ANP, IBAU, FineTuningSAM, FeatureShiftTuning)}


def defense_names() -> list[str]:
    return list(DEFENSES)


def build_defense(name: str, **params) -> Defense:
    key = str(name).strip().lower()
    if key not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}: choose one of {', '.join(DEFENSES)}")
    return DEFENSES[key](**params)


__all__ = ["ABL", "ANP", "ActivationClustering", "DEFENSES", "Defense", "FeatureShiftTuning", "FinePruning", "FineTuning",
           "FineTuningSAM", "IBAU", "NAD", "NeuralCleanse", "PoisonedTraining", "SpectralSignatures", "SuperFineTuning",
           "build_defense", "defense_names"]
