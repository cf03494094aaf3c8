"""bdft_core: poison, train, defend and measure image classifiers (no UI code here).

The public names are re-exported here; see README.md for a tour."""
__version__ = "0.1.0"

from .attacks import ATTACKS, Attack, attack_names, build_attack  # noqa: E402
from .data import DATASETS, ImageData, Splits, augment, available_datasets, data_dir, load_dataset  # noqa: E402
from .compare import compare_defenses, verdict  # noqa: E402
from .defenses import DEFENSES, Defense, PoisonedTraining, build_defense, defense_names  # noqa: E402
from .device import pick_device, setup_threads, tune_allocator  # noqa: E402
from .errors import BdftError, CheckpointError, ConfigError, DatasetNotFound, RunNotFound  # noqa: E402
from .metrics import Evaluator, accuracy  # noqa: E402
from .models import MODELS, build_model  # noqa: E402
from .pipeline import AttackConfig, prepare, run_attack, run_defense, run_demo  # noqa: E402
from .runs import Run, RunStore, load_state_checked  # noqa: E402
from .schedules import SCHEDULES, Constant, SuperFineTuning, WarmupLinear  # noqa: E402
from .sequela import AXES, Axis, SequelaContext, axis_names, build_axis, context_for, evaluate  # noqa: E402
from .sequela_runs import sequela_run, stored_sequela  # noqa: E402
from .sweeps import SweepSpec, estimate, run_sweep, sweep_rows  # noqa: E402
from .train import Progress, TrainConfig, Trainer, TrainResult  # noqa: E402

__all__ = ["ATTACKS", "AXES", "Attack", "AttackConfig", "Axis", "BdftError", "CheckpointError", "ConfigError",
           "Constant", "DATASETS", "DEFENSES", "DatasetNotFound", "Defense", "Evaluator", "ImageData", "MODELS",
           "PoisonedTraining", "Progress", "Run", "RunNotFound", "RunStore", "SCHEDULES", "SequelaContext", "Splits",
           "SuperFineTuning", "SweepSpec", "TrainConfig", "TrainResult", "Trainer", "WarmupLinear", "accuracy",
           "attack_names", "augment", "available_datasets", "axis_names", "build_attack", "build_axis",
           "build_defense", "build_model", "compare_defenses", "context_for", "data_dir", "defense_names", "estimate",
           "evaluate", "load_dataset", "load_state_checked", "pick_device", "prepare", "run_attack", "run_defense",
           "run_demo", "run_sweep", "sequela_run", "setup_threads", "stored_sequela", "sweep_rows", "tune_allocator",
           "verdict"]
