"""I-BAU (implicit backdoor adversarial unlearning): the projection, the inner ascent step (raises the
loss, stays in the ball), the implicit hypergradient against an explicit-Jacobian computation, stop,
bad settings, and on a real poisoned CIFAR-10 model the defense lowers ASR while keeping clean accuracy."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdft_core.defenses.ibau import IBAU, ascent_step, hypergradient, perturbed_loss, project
from bdft_core.errors import ConfigError


class Net(nn.Module):
    """A small smooth model on 1x2x2 images (tanh hidden layer, so second derivatives are not zero)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.hidden(x.flatten(1))))


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand((n, 1, 2, 2), generator=g)  # away from 0 and 1: no clipping
    return x, torch.randint(0, 3, (n,), generator=g)


def test_projection():
    d = torch.tensor([[[3.0, 4.0]]])  # L2 norm 5
    assert torch.allclose(project(d, "l2", 2.5), d / 2)
    assert torch.equal(project(d, "l2", 10.0), d)  # inside: unchanged
    assert torch.equal(project(d, "linf", 3.5), torch.tensor([[[3.0, 3.5]]]))


@pytest.mark.parametrize("norm, radius", [("l2", 0.5), ("linf", 0.1)])
def test_inner_step_raises_the_loss_within_the_ball(norm, radius):
    m = Net()
    x, y = _batch()
    delta = torch.zeros(1, 2, 2)
    losses = [perturbed_loss(m, x, y, delta).item()]
    for _ in range(3):
        delta = ascent_step(m, x, y, delta, norm, radius, 0.5)
        size = delta.abs().max() if norm == "linf" else delta.flatten().norm()
        assert size <= radius + 1e-6
        losses.append(perturbed_loss(m, x, y, delta).item())
    assert losses[1] > losses[0] and losses[-1] > losses[0]
    # the first L2 step is exactly half the radius along the normalised gradient
    if norm == "l2":
        d0 = torch.zeros(1, 2, 2, requires_grad=True)
        (g,) = torch.autograd.grad(perturbed_loss(m, x, y, d0), d0)
        assert torch.allclose(ascent_step(m, x, y, torch.zeros(1, 2, 2), norm, radius, 0.5),
                              0.5 * radius * g / g.norm(), atol=1e-6)


@pytest.mark.parametrize("k, share", [(0, 1.0), (1, 1.0), (3, 1.0), (3, 0.5)])
def test_hypergradient_matches_explicit_jacobians(k, share):
    m = Net()
    x, y = _batch()
    params = list(m.parameters())
    shapes = [p.shape for p in params]
    theta0 = torch.cat([p.detach().flatten() for p in params])
    delta = torch.tensor([[[0.3, -0.2], [0.1, 0.25]]])  # norm ~0.47: on the boundary of the 0.4 ball after P
    radius, eta = 0.4, 0.5
    n_p = max(1, round(share * len(x)))

    def unflat(theta):
        out, i = [], 0
        for s in shapes:
            out.append(theta[i:i + math.prod(s)].view(s))
            i += math.prod(s)
        return out

    def logits(theta, xin):
        w1, b1, w2, b2 = unflat(theta)
        return torch.tanh(xin.flatten(1) @ w1.T + b1) @ w2.T + b2

    def outer(theta, d):
        xin = torch.cat([(x[:n_p] + d).clamp(0, 1), x[n_p:]])
        return F.cross_entropy(logits(theta, xin), y)

    def fmap(theta, d):  # F(delta, theta) = P(delta + eta * grad_delta L_inner)
        def inner(dd):
            return F.cross_entropy(logits(theta, (x[:n_p] + dd).clamp(0, 1)), y[:n_p])
        g = torch.func.grad(inner)(d)
        return project(d + eta * g, "l2", radius)

    jd = torch.autograd.functional.jacobian(lambda d: fmap(theta0, d), delta).reshape(4, 4)  # dF/ddelta
    jt = torch.autograd.functional.jacobian(lambda t: fmap(t, delta), theta0).reshape(4, -1)  # dF/dtheta
    g_theta = torch.func.grad(outer, argnums=0)(theta0, delta)
    g_delta = torch.func.grad(outer, argnums=1)(theta0, delta).reshape(4)
    acc = sum((torch.linalg.matrix_power(jd.T, j) @ g_delta for j in range(k)), torch.zeros(4))
    expected = g_theta + jt.T @ acc
    loss, grads = hypergradient(m, params, x, y, delta, "l2", radius, eta, k, share=share)
    assert loss.item() == pytest.approx(outer(theta0, delta).item(), rel=1e-5)
    assert torch.allclose(torch.cat([g.flatten() for g in grads]), expected, atol=1e-5)
    if k > 0:  # the implicit term is really there
        assert not torch.allclose(expected, g_theta, atol=1e-4)


def _digits():
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    d = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
    m.fit_data(d.x_train)
    return d, m


def test_rounds_progress_stop_and_artefacts():
    d, m = _digits()
    x, y = d.x_train[:128], d.y_train[:128]
    seen = []
    kw = dict(rounds=2, inner_steps=2, outer_steps=3, radius=1.0, batch_size=32)
    before = [p.detach().clone() for p in m.parameters()]
    res = IBAU(**kw).apply(m, x, y, amp="off", callbacks=[("on_batch", lambda p: seen.append((p.step, p.total_steps)))])
    assert seen == [(s, 10) for s in range(1, 11)] and res.steps == res.total_steps == 10 and not res.stopped
    assert res.artefacts["universal_perturbation"].shape == (2, 1, 8, 8)
    assert res.final["delta_norm"] <= 1.0 + 1e-5 and res.final["inner_loss_gain"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))  # the model was trained
    stop = threading.Event()
    stop.set()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = IBAU(**kw).apply(m, x, y, amp="off", stop=stop)
    assert res.stopped and res.steps == 0
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("bad, match", [({"rounds": 0}, "rounds"), ({"inner_steps": 1.5}, "inner_steps"),
                                        ({"outer_steps": 0}, "outer_steps"), ({"norm": "l1"}, "norm"),
                                        ({"radius": 0}, "radius"), ({"norm": "linf", "radius": 2}, "linf radius"),
                                        ({"inner_lr": 0}, "inner_lr"), ({"hyper_k": -1}, "hyper_k"),
                                        ({"hyper_eta": 0}, "hyper_eta"), ({"share": 0}, "share"),
                                        ({"share": 1.5}, "share"), ({"lr": 0}, "learning rate"),
                                        ({"epochs": 3}, "no parameter")])
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        IBAU(**bad)


def test_ibau_on_a_real_poisoned_model(cifar_badnets):
    from bdft_core.defenses import DEFENSES
    from bdft_core.pipeline import run_defense

    DEFENSES.setdefault(IBAU.name, IBAU)
    run, model = cifar_badnets
    d_run, _ = run_defense(run, "i_bau", model=model)
    print("i_bau", run.final, "->", d_run.final, d_run.timings)
    assert d_run.timings["total_s"] > 0 and d_run.defense["name"] == "i_bau"
    assert d_run.final["asr"] < run.final["asr"] - 0.3  # the backdoor weakens
    assert d_run.final["clean_acc"] > run.final["clean_acc"] - 0.1  # clean accuracy is mostly kept
