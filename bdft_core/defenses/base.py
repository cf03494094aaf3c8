"""What every defense shares. A defense takes a (copy of a) poisoned model and the defender's
clean data, changes the model in place, and returns a :class:`~bdft_core.train.TrainResult`.

Defenses that work on the training data itself (data cleansers, anti-backdoor learning) set
``uses_poisoned_data = True``; they also receive a :class:`PoisonedTraining` (the poisoned training
set, the attack run's training settings, and a way to build a fresh model), and may replace the
model's weights with a retrained model's."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import ConfigError, check_numbers
from ..schedules import Constant, Schedule
from ..train import TrainConfig, Trainer


@dataclass
class PoisonedTraining:
    """What a defender who controls training sees: the (poisoned) training set as it was trained on,
    and how the attack run trained. ``poison_idx`` is the ground truth, used only to score a
    detector (precision/recall), never to decide anything."""

    x: torch.Tensor  # uint8 (N, C, H, W) training images, poisoned ones included, on the device
    y: torch.Tensor  # int64 (N,) training labels as given (poisoned labels included)
    poison_idx: torch.Tensor  # indices that carry the trigger (ground truth, for scoring only)
    train: TrainConfig  # the attack run's training settings; retraining reuses them
    new_model: Callable[[], torch.nn.Module]  # a fresh model, fitted to the data, on the device

    def detection_scores(self, flagged: torch.Tensor) -> dict[str, float]:
        """Precision and recall of ``flagged`` (indices) against the true poison set."""
        flagged = torch.as_tensor(flagged).reshape(-1).cpu().long()
        truth = torch.zeros(len(self.y), dtype=torch.bool)
        truth[self.poison_idx.cpu().long()] = True
        tp = int(truth[flagged].sum()) if len(flagged) else 0
        return {"n_flagged": int(len(flagged)), "n_poisoned": int(truth.sum()),
                "precision": tp / len(flagged) if len(flagged) else 0.0,
                "recall": tp / int(truth.sum()) if int(truth.sum()) else 0.0}


class Defense:
    """Base class. ``needs`` says, for the UI and the docs, what the defender must have."""

    name: ClassVar[str] = ""
    uses_poisoned_data: ClassVar[bool] = False  # True: apply() also gets ``poisoned=PoisonedTraining``
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    help: ClassVar[dict[str, str]] = {}

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"defense {self.name} has no parameter(s) {', '.join(sorted(unknown))}; "
                              f"it takes {', '.join(self.defaults)}")
        check_numbers(f"defense {self.name}", self.defaults, params)
        self.params = {**self.defaults, **params}
        self.validate()

    @classmethod
    def get_default_config(cls) -> dict[str, Any]:
        return dict(cls.defaults)

    def validate(self) -> None:
        p = self.params
        if "epochs" in p and not (float(p["epochs"]) > 0 and math.isfinite(float(p["epochs"]))):
            raise ConfigError(f"{self.name}: epochs must be a positive number, got {p['epochs']}")
        if "batch_size" in p and int(p["batch_size"]) < 1:
            raise ConfigError(f"{self.name}: batch size must be at least 1")
        if "lr" in p and not float(p["lr"]) > 0:
            raise ConfigError(f"{self.name}: learning rate must be positive, got {p['lr']}")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    def schedule(self) -> Schedule:
        """The learning-rate schedule this defense will follow (as data, for plotting): a constant
        ``lr`` unless the defense says otherwise."""
        if "lr" in self.params:
            return Constant(float(self.params["lr"]))
        raise NotImplementedError

    def has_schedule(self) -> bool:
        """Whether :meth:`schedule_values` describes this defense's training (a fine-tuning on the
        clean data); defenses with their own phases override or answer False."""
        p = self.params
        own = type(self).schedule is not Defense.schedule  # SFT: base_lr, max_lr1, max_lr2, no single lr
        return (not self.uses_poisoned_data and (own or "lr" in p)
                and all(k in p for k in ("epochs", "batch_size")))

    def epochs_for(self, n_clean: int) -> float:
        """Passes over the clean data: ``epochs``, raised so that at least ``min_steps`` steps run
        (a budget of a few dozen images would otherwise give a handful of steps)."""
        p = self.params
        steps_per_epoch = math.ceil(n_clean / min(int(p["batch_size"]), n_clean))
        return max(float(p["epochs"]), int(p.get("min_steps", 0)) / steps_per_epoch)

    def total_steps(self, n_clean: int) -> int:
        steps_per_epoch = math.ceil(n_clean / min(int(self.params["batch_size"]), n_clean))
        return max(1, math.ceil(self.epochs_for(n_clean) * steps_per_epoch))

    def schedule_values(self, n_clean: int) -> list[float]:
        return self.schedule().values(self.total_steps(n_clean))

    def trainable(self, model):
        """The parameters to train: the final linear layer with ``last_layer_only``, else all
        (None = every parameter that requires grad)."""
        return list(model.classifier.parameters()) if self.params.get("last_layer_only") else None

    def train_config(self, seed: int, n_clean: int, **over) -> TrainConfig:
        p = self.params
        return TrainConfig(epochs=self.epochs_for(n_clean), batch_size=int(p["batch_size"]), lr=self.schedule().lr(0, 1),
                           momentum=float(p.get("momentum", 0.9)), nesterov=False,
                           weight_decay=float(p.get("weight_decay", 5e-4)), label_smoothing=0.0,
                           flip=True, translate=int(p.get("translate", 0)), eval_at_start=True, seed=seed, **over)

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop: threading.Event | None = None,
              seed: int = 0, **train_over):
        """Run the defense on ``model`` (changed in place) with the defender's clean data."""
        tr = Trainer(model, x_clean, y_clean, self.train_config(seed, len(y_clean), **train_over), schedule=self.schedule(),
                     evaluator=evaluator, params=self.trainable(model), stop=stop,
                     freeze_bn=self.trainable(model) is not None)
        for event, fn in (callbacks or []):
            tr.add_callback(event, fn)
        return tr.run()
