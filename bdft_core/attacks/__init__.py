"""Attack registry: name -> class. Adding an attack is one file, one entry here, one test."""
from __future__ import annotations

from ..errors import ConfigError
from .badnets import BadNets
from .base import MODES, Attack, MaskPatternAttack, PoisonedSet, image_to_pattern
from .blended import Blended
from .input_aware import InputAware
from .label_consistent import LabelConsistent
from .latent import Latent
from .lf import LF
from .sig import SIG
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blended, WaNet, SIG, LF, InputAware, LabelConsistent, Latent)}


def attack_names() -> list[str]:
    return list(ATTACKS)


def build_attack(name: str, image_shape, num_classes: int, target: int = 0, mode: str = "all_to_one",
                 seed: int = 0, **params) -> Attack:
    """Build an attack by registry name with its parameters (unknown ones are an error)."""
    key = str(name).strip().lower()
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return ATTACKS[key](image_shape, num_classes, target=target, mode=mode, seed=seed, **params)


__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "InputAware", "LF", "LabelConsistent", "MODES", "MaskPatternAttack", "PoisonedSet", "SIG", "Latent",
           "WaNet", "attack_names", "build_attack", "image_to_pattern"]
