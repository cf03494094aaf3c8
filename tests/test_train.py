"""The training loop: learning, callbacks, cooperative stop, seeding."""
import threading

import pytest
import torch

from bdft_core.data import load_dataset
from bdft_core.errors import ConfigError
from bdft_core.metrics import Evaluator, accuracy
from bdft_core.models import build_model
from bdft_core.train import TrainConfig, Trainer, batch_indices


def _setup(widths=(16, 16, 32)):
    d = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("fastnet", 10, 1, widths=widths)
    m.fit_data(d.x_train)
    return d, m


def test_training_learns_digits_and_fires_callbacks():
    d, m = _setup()
    ev = Evaluator(d.x_test, d.y_test)
    tr = Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=6, batch_size=128, lr=0.2, eval_every=3), evaluator=ev)
    epochs, steps = [], []
    tr.add_callback("on_epoch_end", epochs.append)
    tr.add_callback("on_step", steps.append)
    res = tr.run()
    assert res.final["clean_acc"] > 0.85 and not res.stopped
    assert [round(p.epoch) for p in epochs] == [1, 2, 3, 4, 5, 6]
    assert steps and all(p.step % 3 == 0 for p in steps)
    assert all(p.clean_acc is not None and 0 <= p.clean_acc <= 1 and p.lr >= 0 for p in epochs)
    assert len(res.history) == len(epochs) + len(steps)


def test_a_last_batch_of_one_image_takes_its_neighbour():
    perm = torch.arange(9)
    assert [batch_indices(perm, i, 4).tolist() for i in range(0, 9, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [7, 8]]
    assert [batch_indices(perm, i, 4).tolist() for i in range(0, 8, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [batch_indices(perm[:3], i, 1).tolist() for i in range(3)] == [[0], [1], [2]]  # batch size 1 stays 1
    assert batch_indices(perm[:1], 0, 4).tolist() == [0]


def test_129_images_in_batches_of_64_train_on_8x8_digits():
    """fastnet's last block is 1x1 on 8x8 images, where BatchNorm cannot train on one image: the
    third batch of 129 (one image) used to raise; now it takes a neighbour, and the epoch has 3 steps."""
    d, m = _setup()
    tr = Trainer(m, d.x_train[:129], d.y_train[:129], TrainConfig(epochs=1, batch_size=64))
    seen = []
    tr.add_callback("on_batch", seen.append)
    res = tr.run()
    assert res.steps == 3 and not res.stopped and [p.step for p in seen] == [1, 2, 3]


def test_stop_flag_ends_within_one_step_and_keeps_progress():
    d, m = _setup()
    stop = threading.Event()
    tr = Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=50, batch_size=64, eval_every=1),
                 evaluator=Evaluator(d.x_test, d.y_test), stop=stop)
    tr.add_callback("on_step", lambda p: stop.set() if p.step == 5 else None)
    res = tr.run()
    assert res.stopped and res.steps == 5 and res.total_steps > 5
    assert res.final["clean_acc"] is not None
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5]  # the stop at a live point is not drawn twice


def test_same_seed_same_model():
    outs = []
    for _ in range(2):
        d, m = _setup((8, 8, 8))
        Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=1, batch_size=128, seed=7, amp="off")).run()
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_accuracy_is_exact_on_a_hand_built_model():
    class Threshold(torch.nn.Module):  # class 1 when the mean pixel is above 0.5
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            s = x.mean(dim=(1, 2, 3)) - 0.5
            return torch.stack([-s, s], 1) * self.w

    x = torch.tensor([0, 200, 255, 10], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    assert accuracy(Threshold(), x, torch.tensor([0, 1, 1, 1]), channels_last=False) == 0.75


def test_evaluator_remembers_a_model_state_and_derives_live_figures_from_a_full_pass():
    d, m = _setup()
    x_bd, y_bd = d.x_test[:50], torch.zeros(50, dtype=torch.long)
    ev = Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=40)
    fresh = Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=40)
    full = ev(m)
    n_full = ev.evaluated_images
    assert n_full == len(d.y_test) + 50
    live = ev(m, live=True)  # the live subsets are part of the full pass: nothing runs again
    assert ev.evaluated_images == n_full
    assert live == fresh(m, live=True)  # and equal to evaluating the live subsets directly
    assert full == fresh(m)
    import copy

    twin = copy.deepcopy(m)  # same weights: a defense's starting point reuses the figures
    assert ev(twin, live=True) == live and ev.evaluated_images == n_full
    with torch.no_grad():
        twin.classifier.bias.add_(1.0)  # changed weights: evaluated again
    ev(twin, live=True)
    assert ev.evaluated_images == n_full + 40 + 40
    ev(m, live=True, amp_dtype=torch.bfloat16)  # other settings: evaluated again
    assert ev.evaluated_images == n_full + 4 * 40



def test_live_evaluations_use_the_size_asked_for_and_share_what_was_measured():
    d, m = _setup()
    x_bd, y_bd = d.x_test[:50], torch.zeros(50, dtype=torch.long)
    ev = Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=40)
    small = ev(m, live=True, live_samples=10)
    assert ev.evaluated_images == 10 + 10
    assert small == Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=10)(m, live=True)  # the first 10 of the 40
    view = ev.with_live_samples(10)
    assert view.live_sizes == (10, 10) and ev.live_sizes == (40, 40)
    assert view(m, live=True) == small and ev.evaluated_images == 20  # the view shares the cache
    ev(m)  # a full pass; every live size is then derived from it
    n_full = 20 + len(d.y_test) + 50
    assert ev.evaluated_images == view.evaluated_images == n_full
    assert ev(m, live=True) == Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=40)(m, live=True)
    assert ev(m, live=True, live_samples=25) == Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=25)(m, live=True)
    assert ev.evaluated_images == n_full
    assert ev.with_live_samples(None) is ev and ev.with_live_samples(40) is ev
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ConfigError, match="live_samples"):
            ev.with_live_samples(bad)
        with pytest.raises(ConfigError, match="live_samples"):
            ev(m, live=True, live_samples=bad)
    with pytest.raises(ConfigError, match="live_samples"):
        TrainConfig(live_samples=0).validate()


def test_trainer_evaluates_live_points_on_train_configs_live_samples():
    d, m = _setup()
    x_bd, y_bd = d.x_test[:50], torch.zeros(50, dtype=torch.long)
    ev = Evaluator(d.x_test, d.y_test, x_bd, y_bd, live_samples=40)
    cfg = TrainConfig(epochs=1, batch_size=256, eval_every=1, live_samples=7, amp="off")
    steps = -(-len(d.y_train) // 256)
    tr = Trainer(m, d.x_train, d.y_train, cfg, evaluator=ev)
    points = []
    tr.add_callback("on_step", points.append)
    tr.run()
    assert len(points) == steps - 1  # every step but the last, which ends the epoch
    # a live pass of 7 + 7 images after each of those steps, then the full pass (whose live point is derived)
    assert ev.evaluated_images == (steps - 1) * (7 + 7) + len(d.y_test) + 50

def test_untrained_parameters_get_no_gradient_and_are_restored_afterwards():
    d, m = _setup((8, 8, 8))
    body_before = [p.detach().clone() for p in m.body.parameters()]
    grads = []  # after each step, whether any body parameter received a gradient
    tr = Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=1, batch_size=128, amp="off"),
                 params=list(m.classifier.parameters()), freeze_bn=True)
    tr.add_callback("on_batch", lambda p: grads.append(any(q.grad is not None for q in m.body.parameters())))
    tr.run()
    assert grads and not any(grads)  # the backward pass stopped at the head
    assert all(torch.equal(a, b) for a, b in zip(body_before, m.body.parameters()))
    # requires_grad is as before the run (the whitening weight was frozen by the model itself)
    assert [p.requires_grad for p in m.body.parameters()] == [p is not m.whiten.weight for p in m.body.parameters()]


def test_whitening_bias_trains_for_its_epochs_then_stays_fixed():
    def bias_at_epoch_ends(w):
        d, m = _setup((8, 8, 8))
        start = m.whiten.bias.detach().clone()
        seen = []
        tr = Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=3, batch_size=256, amp="off", whiten_bias_epochs=w))
        tr.add_callback("on_epoch_end", lambda p: seen.append(m.whiten.bias.detach().clone()))
        tr.run()
        assert m.whiten.bias.requires_grad  # restored after the run
        return start, seen

    start, seen = bias_at_epoch_ends(None)  # trains throughout
    assert not torch.equal(start, seen[0]) and not torch.equal(seen[1], seen[2])
    start, seen = bias_at_epoch_ends(1.0)  # trains in epoch 1 only
    assert not torch.equal(start, seen[0]) and torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    start, seen = bias_at_epoch_ends(0.0)  # never (an option; the defenses train it: see README)
    assert all(torch.equal(start, s) for s in seen)
    with pytest.raises(ConfigError, match="whiten_bias_epochs"):
        TrainConfig(whiten_bias_epochs=-1).validate()
