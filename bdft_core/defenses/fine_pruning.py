"""Fine-Pruning: prune the last convolutional layer's channels that stay dormant on clean data (the
backdoor tends to live in them), then fine-tune.

Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018 (arXiv:1805.12185).

Here the "last convolutional layer" is the model's last BatchNorm2d (its output feeds the last
activation before global pooling, in fastnet and ResNet-18 alike): a pruned channel gets BN weight and
bias 0, so it outputs 0 after the activation, and stays 0 during the fine-tuning that follows (a
forward hook masks it). Channels are ranked by their mean activation on the defender's clean images;
the ``prune_ratio`` least active are pruned (the paper prunes until clean accuracy drops by a few
points; a fixed share is the common reimplementation default).

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import Defense


def last_batchnorm(model) -> nn.BatchNorm2d:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ConfigError("fine-pruning needs a model with BatchNorm2d layers (fastnet, resnet18)")
    return bns[-1]


@torch.no_grad()
def channel_activity(model, bn: nn.BatchNorm2d, x_uint8: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Mean post-activation output of each of ``bn``'s channels over ``x_uint8`` (eval mode)."""
    acts = []
    hook = bn.register_forward_hook(lambda m, i, o: acts.append(torch.relu(o.float()).mean(dim=(0, 2, 3)) * len(o)))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x_uint8), batch):
            model(x_uint8[i:i + batch].float() / 255.0)
    finally:
        hook.remove()
        model.train(was)
    return torch.stack(acts).sum(0) / len(x_uint8)


class FinePruning(Defense):
    name = "fine_pruning"
    title = "Fine-Pruning"
    paper = "Liu et al. 2018, Fine-Pruning, RAID (arXiv:1805.12185)"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"prune_ratio": 0.3, "lr": 0.01, "epochs": 4.0, "min_steps": 60, "batch_size": 64, "momentum": 0.9,
                "weight_decay": 5e-4}
    help = {"prune_ratio": "share of the last layer's channels pruned, the least active on clean data first",
            "lr": "fine-tuning learning rate (constant)", "epochs": "fine-tuning passes over the clean data",
            "min_steps": "run at least this many steps (small budgets)", "batch_size": "images per step",
            "momentum": "SGD momentum", "weight_decay": "L2 weight decay"}

    def validate(self):
        super().validate()
        if not 0.0 <= float(self.params["prune_ratio"]) < 1.0:
            raise ConfigError(f"fine_pruning: prune_ratio must be in [0, 1), got {self.params['prune_ratio']}")

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        bn = last_batchnorm(model)
        activity = channel_activity(model, bn, x_clean)
        k = int(round(float(self.params["prune_ratio"]) * len(activity)))
        pruned = torch.argsort(activity)[:k]
        mask = torch.ones(len(activity), device=activity.device)
        mask[pruned] = 0.0
        with torch.no_grad():
            bn.weight.mul_(mask.to(bn.weight.dtype))
            bn.bias.mul_(mask.to(bn.bias.dtype))
        shape = (1, -1, 1, 1)
        hook = bn.register_forward_hook(lambda m, i, o: o * mask.view(shape).to(o.dtype))
        try:
            res = super().apply(model, x_clean, y_clean, evaluator=evaluator, callbacks=callbacks, stop=stop,
                                seed=seed, **train_over)
        finally:
            hook.remove()
        with torch.no_grad():  # the saved weights carry the pruning without the hook
            bn.weight.mul_(mask.to(bn.weight.dtype))
            bn.bias.mul_(mask.to(bn.bias.dtype))
        res.final = {**res.final, "pruned_channels": k}
        self.pruned = pruned.tolist()
        return res
