"""bdft_core: poison, train, defend and measure image classifiers (no UI code here).

The public names are re-exported here; see README.md for a tour."""
__version__ = "0.1.0"

from .attacks import ATTACKS, Attack, attack_names, build_attack  # noqa: E402
from .data import DATASETS, ImageData, Splits, augment, available_datasets, data_dir, load_dataset  # noqa: E402
from .defenses import DEFENSES, Defense, build_defense, defense_names  # noqa: E402
from .device import pick_device  # noqa: E402
from .errors import BdftError, CheckpointError, ConfigError, DatasetNotFound, RunNotFound  # noqa: E402
from .metrics import Evaluator, accuracy  # noqa: E402
from .models import MODELS, build_model  # noqa: E402
from .pipeline import AttackConfig, prepare, run_attack, run_defense, run_demo  # noqa: E402
from .runs import Run, RunStore, load_state_checked  # noqa: E402
from .schedules import SCHEDULES, Constant, SuperFineTuning, WarmupLinear  # noqa: E402
from .train import Progress, TrainConfig, Trainer, TrainResult  # noqa: E402

__all__ = ["ATTACKS", "Attack", "AttackConfig", "BdftError", "CheckpointError", "ConfigError", "Constant",
           "DATASETS", "DEFENSES", "DatasetNotFound", "Defense", "Evaluator", "ImageData", "MODELS", "Progress",
           "Run", "RunNotFound", "RunStore", "SCHEDULES", "Splits", "SuperFineTuning", "TrainConfig", "TrainResult",
           "Trainer", "WarmupLinear", "accuracy", "attack_names", "augment", "available_datasets", "build_attack",
           "build_defense", "build_model", "data_dir", "defense_names", "load_dataset", "load_state_checked",
           "pick_device", "prepare", "run_attack", "run_defense", "run_demo"]
