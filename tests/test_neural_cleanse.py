"""Neural Cleanse: the MAD anomaly index, trigger reverse engineering on a hand-built model whose
backdoor is one bright pixel, the nothing-flagged path, stopping, bad settings, and a real poisoned
CIFAR-10 model (BadNets, target 0) through run_defense (measured there: target flagged alone, anomaly
index 3.8 on the default log scale, 1.5 on the paper's; CA 0.729 -> 0.676, ASR 0.968 -> 0.239; about
100 s on the busy 2-core CPU, an estimated 50-60 s idle)."""
import math
import threading

import pytest
import torch
from torch import nn

from bdft_core.defenses.neural_cleanse import (NeuralCleanse, anomaly_indices, flag_classes,
                                               reversed_trigger_image)
from bdft_core.errors import ConfigError


@pytest.fixture
def one_thread():
    """The toy tests' tensors are tiny: one thread is faster than two (and much faster than two on
    a busy machine, where every operation would wait for the second thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the anomaly index --------------------------------------------------------------------------

def test_mad_anomaly_index_by_hand():
    norms = [10.0, 12.0, 11.0, 2.0, 13.0, 9.0]
    # median of 2, 9, 10, 11, 12, 13 = 10.5; |x - 10.5| = .5 1.5 .5 8.5 2.5 1.5 -> sorted .5 .5 1.5 1.5 2.5 8.5,
    # MAD = 1.5; index = |x - 10.5| / (1.4826 * 1.5)
    idx = anomaly_indices(norms)
    expected = torch.tensor([0.5, 1.5, 0.5, 8.5, 2.5, 1.5], dtype=torch.float64) / (1.4826 * 1.5)
    assert torch.allclose(idx, expected)
    assert idx[3].item() == pytest.approx(3.8222, abs=1e-4)
    flagged, index = flag_classes(norms)
    assert flagged == [3]  # 13 is not small, and its index (1.12) is below 2 anyway
    assert torch.allclose(index, expected)
    # a large outlier is never flagged (only abnormally small triggers betray a target)
    assert flag_classes([10.0, 10.5, 9.5, 10.0, 40.0])[0] == []
    # a lower threshold flags more; a zero MAD makes any deviation infinitely anomalous
    assert flag_classes(norms, threshold=1.0)[0] == [3]
    assert flag_classes([5.0, 5.0, 5.0, 1.0])[0] == [3]
    # too few finite norms: nothing can be said
    assert flag_classes([1.0, float("nan")])[0] == []


def test_reversed_trigger_image():
    m = torch.zeros(1, 4, 4)
    m[0, 1, 2] = 0.5
    p = torch.ones(3, 4, 4)
    img = reversed_trigger_image(m, p)
    assert img.shape == (3, 4, 4) and img.dtype == torch.float32
    assert img[:, 1, 2].tolist() == [0.5, 0.5, 0.5] and img.sum().item() == pytest.approx(1.5)
    assert reversed_trigger_image(m[0], p).shape == (3, 4, 4)  # (H, W) masks work too
    with pytest.raises(ConfigError, match="same size"):
        reversed_trigger_image(torch.zeros(1, 5, 5), p)


# --- a hand-built model with a one-pixel backdoor -----------------------------------------------

class PixelModel(nn.Module):
    """1x10x10 images, 5 classes. Class j scores 4 x the mean brightness of its region, the first
    14 + j pixels of rows 2j and 2j + 1 (regions of slightly different sizes, so the classes need
    triggers of somewhat different sizes, as real classes do), except the backdoor ``target``, which
    scores 30 x the brightness of one pixel - 21: it never wins on the clean images, but one bright
    pixel makes it win. ``target=None``: no backdoor."""

    def __init__(self, target=2, pixel=(6, 5)):
        super().__init__()
        self.target, self.pixel = target, pixel
        self.classifier = nn.Linear(5, 5)
        with torch.no_grad():
            w = torch.full((5,), 4.0)
            b = torch.zeros(5)
            if target is not None:
                w[target], b[target] = 30.0, -21.0
            self.classifier.weight.copy_(torch.diag(w))
            self.classifier.bias.copy_(b)

    def features(self, x):
        rows = x[:, 0].reshape(len(x), 5, 20)  # each pair of rows, flattened
        f = [rows[:, j, :14 + j].mean(1) for j in range(5)]
        if self.target is not None:
            f[self.target] = x[:, 0, self.pixel[0], self.pixel[1]]
        return torch.stack(f, 1)

    def forward(self, x):
        return self.classifier(self.features(x))


def toy_data(target=2, n=300, seed=0):
    """Dark images (about 0.08) whose class's region is brighter (about 0.41); no image is of the
    backdoor target. Returns uint8 images and their (true) labels."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor([j for j in range(5) if j != target])
    y = classes[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randint(0, 40, (n, 1, 10, 10), generator=g, dtype=torch.uint8)
    flat = x.view(n, 100)  # row r, column c at 10 r + c: the region of class j starts at 20 j
    for j in classes.tolist():
        rows = y == j
        flat[rows, 20 * j:20 * j + 14 + j] = torch.randint(90, 120, (int(rows.sum()), 14 + j), generator=g,
                                                          dtype=torch.uint8)
    return x, y


def test_reversed_mask_finds_the_bright_pixel_and_the_target_is_flagged(one_thread):
    torch.manual_seed(0)
    model = PixelModel(target=2, pixel=(6, 5))
    x, y = toy_data(target=2)
    with torch.no_grad():
        assert (model(x.float() / 255).argmax(1) == y).all()  # the clean images never reach the target
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    d = NeuralCleanse(reverse_steps=100, reverse_images=300, epochs=1.0, min_steps=5)
    res = d.apply(model, x, y, callbacks=[("on_batch", lambda p: seen.append((p.step, p.total_steps)))])
    mask = res.artefacts["masks"][2, 0]
    assert divmod(int(mask.argmax()), 10) == (6, 5)  # the reversed trigger sits on the backdoor pixel
    assert mask[6, 5] > 0.5 and mask[6, 5] > 5 * mask.flatten().sort().values[-2]
    l1 = res.final["mask_l1"]
    assert len(l1) == 5 and l1[2] < 0.25 * min(v for j, v in enumerate(l1) if j != 2)
    assert res.final["flagged_classes"] == [2] and res.final["unlearned"]
    assert res.final["anomaly_index"] > 2 and res.final["anomaly_index_l1"] > 2  # on either scale
    a = res.artefacts
    assert a["masks"].shape == (5, 1, 10, 10) and a["patterns"].shape == (5, 1, 10, 10)
    assert a["mask_l1"].shape == (5,) and a["flagged"].dtype == torch.int64 and a["flagged"].tolist() == [2]
    assert a["patterns"][2, 0, 6, 5] > 0.8  # the pattern is bright where the mask is
    # progress: one bar across reverse engineering (5 x 100 steps) and unlearning
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and steps[499] == 500 and steps[-1] == seen[-1][1] == res.total_steps > 500
    assert res.steps == res.total_steps and not res.stopped and res.seconds > 0
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in w0.items())  # unlearning changed it


def test_nothing_flagged_leaves_the_model_unchanged(one_thread):
    model = PixelModel(target=2)
    x, y = toy_data(target=2)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    res = NeuralCleanse(reverse_steps=40, reverse_images=300, anomaly_threshold=1000).apply(model, x, y)
    assert res.final["flagged_classes"] == [] and not res.final["unlearned"]
    assert res.artefacts["flagged"].numel() == 0 and res.final["unlearn_s"] == 0
    assert len(res.final["mask_l1"]) == 5 and res.steps == res.total_steps
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w0.items())


def test_a_class_whose_trigger_never_worked_is_not_flagged(one_thread):
    """With 2 steps no reversed trigger reaches attack_threshold: such a class has no trigger to compare
    (its closest try has a small mask, which used to look anomalous and be unlearned), so nothing is
    flagged, yet the run is complete; the model is left in eval mode as by every defense."""
    model = PixelModel(target=2)
    model.train()
    x, y = toy_data(target=2)
    res = NeuralCleanse(reverse_steps=2, reverse_images=300, mask_init=1e-3).apply(model, x, y)
    assert max(res.final["trigger_success"]) < 0.99
    assert res.final["mask_l1"] == [math.inf] * 5 and res.final["reversed_classes"] == 0
    assert res.final["flagged_classes"] == [] and not res.final["unlearned"] and not res.stopped
    assert not model.training


def test_stop_ends_early_and_keeps_what_was_reached(one_thread):
    model = PixelModel()
    x, y = toy_data(n=100)
    stop = threading.Event()
    n = []

    def on_batch(p):
        n.append(p.step)
        if p.step == 50:
            stop.set()

    res = NeuralCleanse(reverse_steps=30).apply(model, x, y, stop=stop, callbacks=[("on_batch", on_batch)])
    assert res.stopped and max(n) == 50
    assert res.final["reversed_classes"] == 1  # the first class finished, the second was cut short
    assert res.final["flagged_classes"] == [] and not res.final["unlearned"]


@pytest.mark.parametrize("params, match", [
    ({"reverse_steps": 0}, "reverse_steps"), ({"reverse_batch": 2.5}, "reverse_batch"),
    ({"reverse_images": 0}, "reverse_images"), ({"reverse_lr": 0}, "reverse_lr"),
    ({"init_cost": -1}, "init_cost"), ({"cost_multiplier": 1.0}, "cost_multiplier"),
    ({"patience": 0}, "patience"), ({"attack_threshold": 1.5}, "attack_threshold"),
    ({"anomaly_threshold": 0}, "anomaly_threshold"), ({"unlearn_share": 1.0}, "unlearn_share"),
    ({"restarts": 0}, "restarts"), ({"restarts": 8, "reverse_batch": 4}, "cannot exceed"),
    ({"mask_init": 0}, "mask_init"), ({"norm_scale": "sqrt"}, "norm_scale"),
    ({"lr": 0}, "learning rate"), ({"epochs": 0}, "epochs"), ({"reverse_lr": "fast"}, "reverse_lr must be a number"),
    ({"bogus": 1}, "no parameter"),
])
def test_bad_configs(params, match):
    with pytest.raises(ConfigError, match=match):
        NeuralCleanse(**params)


def test_every_param_has_help():
    assert set(NeuralCleanse.help) == set(NeuralCleanse.defaults)


# --- a real poisoned model ----------------------------------------------------------------------

def test_on_a_real_badnets_model(cifar_badnets, monkeypatch):
    from bdft_core.defenses import DEFENSES
    from bdft_core.pipeline import run_defense

    monkeypatch.setitem(DEFENSES, NeuralCleanse.name, NeuralCleanse)  # run_defense looks names up there
    run, model = cifar_badnets
    assert run.final["asr"] > 0.9
    d_run, _ = run_defense(run, "neural_cleanse", model=model)
    f = d_run.final
    print("neural_cleanse:", {k: f[k] for k in ("clean_acc", "asr", "flagged_classes", "anomaly_index",
                                               "anomaly_index_l1", "reverse_s", "unlearn_s")},
          "mask_l1", [round(v, 1) for v in f["mask_l1"]], "total_s", round(d_run.timings["total_s"], 1))
    assert 0 in f["flagged_classes"] and f["unlearned"]  # the attack's target
    assert min(range(10), key=f["mask_l1"].__getitem__) == 0  # its reversed trigger is the smallest
    assert f["asr"] < run.final["asr"] - 0.3
    assert f["clean_acc"] > run.final["clean_acc"] - 0.1
    assert d_run.timings["total_s"] > 0 and len(f["mask_l1"]) == 10
