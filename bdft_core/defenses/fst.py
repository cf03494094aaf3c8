"""FST (feature shift tuning): re-initialise the linear head and fine-tune the whole model while
pushing the new head away from the old one, so the features must shift away from those the backdoor
used; the head's norm is kept at the original's.

Min, Weng, Zhang, Wu, Tang, Lin, Huang and Li, "Towards Stable Backdoor Purification through
Feature Shift Tuning", NeurIPS 2023 (arXiv:2310.01875). Loss: cross-entropy + ``alpha`` * <W, W_0>
(W the new head's weights, W_0 the poisoned model's), with ||W|| projected onto ||W_0|| after each
step.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..train import Trainer
from .base import Defense


class FeatureShiftTuning(Defense):
    name = "fst"
    title = "FST (feature shift tuning)"
    paper = "Min et al. 2023, NeurIPS (arXiv:2310.01875)"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"lr": 0.01, "alpha": 0.2, "epochs": 4.0, "min_steps": 60, "batch_size": 64, "momentum": 0.9,
                "weight_decay": 5e-4}
    help = {"lr": "learning rate (constant)", "alpha": "weight of the term pushing the new head away from the old",
            "epochs": "passes over the clean data", "min_steps": "run at least this many steps (small budgets)",
            "batch_size": "images per step", "momentum": "SGD momentum", "weight_decay": "L2 weight decay"}

    def validate(self):
        super().validate()
        if not float(self.params["alpha"]) >= 0:
            raise ConfigError(f"fst: alpha must be >= 0, got {self.params['alpha']}")

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        head = model.classifier
        w0 = head.weight.detach().clone()
        norm0 = w0.norm()
        g = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():  # a fresh head, initialised as nn.Linear does
            bound = 1 / math.sqrt(head.in_features)
            head.weight.copy_((torch.rand(head.weight.shape, generator=g) * 2 - 1).to(w0) * bound)
            head.bias.zero_()
        alpha = float(self.params["alpha"])

        def shift(m, step, gen):
            return alpha * (m.classifier.weight * w0).sum()

        def project(_):  # the paper's constraint ||W|| = ||W_0||, an equality (as its code does after every step)
            with torch.no_grad():
                n = head.weight.norm()
                if n > 0:
                    head.weight.mul_(norm0 / n)

        tr = Trainer(model, x_clean, y_clean, self.train_config(seed, len(y_clean), **train_over),
                     schedule=self.schedule(), evaluator=evaluator, stop=stop, extra_loss=shift)
        tr.add_callback("on_batch", project)
        for event, fn in (callbacks or []):
            tr.add_callback(event, fn)
        return tr.run()
