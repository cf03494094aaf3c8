"""Fine-tuning (FT): keep training the model on the defender's clean data with a small constant
learning rate; the backdoor, never reinforced, fades.

As evaluated in Sha et al., "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
arXiv:2212.09067 (and as the classic baseline of Liu et al. 2018, Fine-Pruning).

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

from .base import Defense


class FineTuning(Defense):
    name = "ft"
    title = "Fine-tuning (FT)"
    paper = "Sha et al. 2022, arXiv:2212.09067"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"lr": 0.01, "epochs": 4.0, "min_steps": 60, "batch_size": 64, "last_layer_only": False, "momentum": 0.9,
                "weight_decay": 5e-4}
    help = {"lr": "learning rate (constant)", "epochs": "passes over the clean data", "min_steps": "run at least this many steps (small budgets)",
            "batch_size": "images per step", "last_layer_only": "train only the final linear layer",
            "momentum": "SGD momentum", "weight_decay": "L2 weight decay"}

