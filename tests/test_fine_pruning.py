"""Fine-Pruning: the dormant channels are the ones pruned, they stay pruned through fine-tuning and
in the saved weights. (On a real poisoned model: tests/test_e2e_baselines.py.)"""
import pytest
import torch
from torch import nn

from bdft_core.defenses import build_defense
from bdft_core.defenses.fine_pruning import channel_activity, last_batchnorm
from bdft_core.errors import ConfigError


class Tiny(nn.Module):
    """Two channels after the last BN: channel 0 copies the input's mean, channel 1 is constant 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[1.0]]], [[[0.0]]]]))
        self.bn = nn.BatchNorm2d(2).eval()
        self.classifier = nn.Linear(2, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_activity_ranks_the_dormant_channel_last():
    m = Tiny()
    x = torch.full((4, 1, 2, 2), 255, dtype=torch.uint8)  # pixels 1.0 -> channel 0 outputs 1/sqrt(1+eps)
    act = channel_activity(m, last_batchnorm(m), x)
    assert act[0].item() == pytest.approx(1 / (1 + 1e-5) ** 0.5, rel=1e-4) and act[1].item() == 0.0


def test_pruned_channels_stay_zero_through_fine_tuning():
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    d = load_dataset("digits")
    m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
    m.fit_data(d.x_train)
    fp = build_defense("fine_pruning", prune_ratio=0.5, epochs=1.0, min_steps=5)
    res = fp.apply(m, d.x_train[:300], d.y_train[:300], seed=0)
    bn = last_batchnorm(m)
    assert res.final["pruned_channels"] == 4 and len(fp.pruned) == 4
    assert torch.all(bn.weight[fp.pruned] == 0) and torch.all(bn.bias[fp.pruned] == 0)
    assert torch.all(bn.weight[[i for i in range(8) if i not in fp.pruned]] != 0)


def test_bad_prune_ratio():
    with pytest.raises(ConfigError, match="prune_ratio"):
        build_defense("fine_pruning", prune_ratio=1.0)

