"""Super-fine-tuning (SFT): fine-tuning with a two-phase cyclic learning rate, large then small.

Sha, He, Berrang, Humbert and Zhang, "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
arXiv:2212.09067, 2022. Defaults (base 3e-4, phase-1 maximum 0.1, phase-2 maximum 0.001, phase 1
= 40% of the steps) follow published reimplementations; all are adjustable.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

from ..schedules import SuperFineTuning as SFTSchedule
from .base import Defense


class SuperFineTuning(Defense):
    name = "sft"
    title = "Super-fine-tuning (SFT)"
    paper = "Sha et al. 2022, arXiv:2212.09067"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"base_lr": 3e-4, "max_lr1": 0.1, "max_lr2": 0.001, "phase1": 0.4, "cycles": 1, "epochs": 4.0, "min_steps": 60,
                "batch_size": 64, "last_layer_only": False, "momentum": 0.9, "weight_decay": 5e-4}
    help = {"base_lr": "lowest learning rate of each cycle", "max_lr1": "peak learning rate in phase 1 (large)",
            "max_lr2": "peak learning rate in phase 2 (small)", "phase1": "share of the steps in phase 1",
            "cycles": "triangular cycles per phase", "epochs": "passes over the clean data", "min_steps": "run at least this many steps (small budgets)",
            "batch_size": "images per step", "last_layer_only": "train only the final linear layer",
            "momentum": "SGD momentum", "weight_decay": "L2 weight decay"}

    def validate(self):
        super().validate()
        self.schedule()  # the schedule checks its own numbers

    def schedule(self):
        p = self.params
        return SFTSchedule(base=float(p["base_lr"]), max1=float(p["max_lr1"]), max2=float(p["max_lr2"]),
                           phase1=float(p["phase1"]), cycles=int(p["cycles"]))
