"""Label-consistent backdoor: the four-corner trigger pixel by pixel, PGD within its budget and
raising the surrogate's loss, clean-label poisoning, the surrogate cache, settings checks, and one
real CIFAR-10 run through the registry."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdft_core.attacks.input_aware import _MEMORY, data_fingerprint, trigger_cache_path
from bdft_core.attacks.label_consistent import LabelConsistent, corner_pattern, pgd_perturb
from bdft_core.data import Splits, load_dataset
from bdft_core.errors import ConfigError

TINY = {"surrogate_epochs": 0.5}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").subset(400, 100, seed=0)  # small: the surrogate trains in a step or two


def test_four_corner_checkerboard_lands_on_the_corner_pixels_exact():
    a = LabelConsistent((3, 12, 12), 10, size=3)
    out = a.apply(torch.full((1, 3, 12, 12), 0.5))
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    expected = torch.full((1, 3, 12, 12), 0.5)
    for r in (slice(0, 3), slice(9, 12)):
        for c in (slice(0, 3), slice(9, 12)):
            expected[..., r, c] = board
    assert torch.equal(out, expected)


def test_default_patch_is_5x5_and_shrinks_to_a_quarter_of_small_images():
    assert LabelConsistent((3, 32, 32), 10).size == 5
    small = LabelConsistent((1, 8, 8), 10)  # digits: 2x2 corners, not the whole image
    assert small.size == 2 and small.mask.sum() == 16


def test_even_patches_are_mirrored_so_flips_keep_the_trigger():
    mask, pattern = corner_pattern(1, 6, 6, 2)
    assert torch.equal(pattern[0, :2, :2], torch.tensor([[1.0, 0], [0, 1]]))  # white at the outer corner pixel
    assert torch.equal(pattern[0, :2, 4:], torch.tensor([[0.0, 1], [1, 0]]))
    assert torch.equal(pattern[0, 4:, :2], torch.tensor([[0.0, 1], [1, 0]]))
    assert torch.equal(pattern[0, 4:, 4:], torch.tensor([[1.0, 0], [0, 1]]))
    assert mask.sum() == 16 and mask[0, 2:4].sum() == 0 and mask[0, :, 2:4].sum() == 0
    a = LabelConsistent((3, 8, 8), 10, size=2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.apply(x).flip(3), a.apply(x.flip(3)))


def test_amplitude_blends_towards_the_pattern():
    a = LabelConsistent((1, 16, 16), 10, amplitude=0.25, size=3)
    x = torch.full((1, 1, 16, 16), 0.4)
    out = a.apply(x)
    assert torch.allclose(out[0, 0, 0, 0], torch.tensor(0.4 * 0.75 + 0.25))  # white pixel
    assert torch.allclose(out[0, 0, 0, 1], torch.tensor(0.4 * 0.75))  # black pixel
    assert torch.equal(out[..., 3:13, :], x[..., 3:13, :])


def test_pgd_stays_within_eps_and_the_pixel_range_and_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(32, 3, 4, 4)
    y = torch.arange(32) % 4
    eps = 8 / 255
    xa = pgd_perturb(model, x, y, eps, steps=7)
    assert (xa - x).abs().max() <= eps + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() > eps / 2  # it moved
    with torch.no_grad():
        assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y) + 0.01
    assert all(p.requires_grad for p in model.parameters()) and model.training  # the model is left as it was
    assert torch.equal(pgd_perturb(model, x, y, 0.0, steps=5), x)  # eps 0: no change


def test_clean_label_poisoning_hardens_target_images_within_eps_and_keeps_labels(digits):
    a = LabelConsistent(digits.image_shape, 10, target=2, eps=16 / 255, steps=5, size=2, **TINY)
    a.fit_to(digits)
    x, y = digits.x_train, digits.y_train
    ps = a.poison(x, y, 0.5, Splits(len(y), 0))  # asks for more than the target class has: capped
    n_target = int((y == 2).sum())
    assert len(ps.poison_idx) == n_target and torch.all(y[ps.poison_idx] == 2) and len(ps.noise_idx) == 0
    assert torch.equal(ps.y, y)  # no label changes at all
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[ps.poison_idx] = False
    assert torch.equal(ps.x[untouched], x[untouched])
    inner = torch.ones(8, 8, dtype=torch.bool)  # away from the corner patches: only the PGD perturbation
    inner[:2, :2] = inner[:2, 6:] = inner[6:, :2] = inner[6:, 6:] = False
    diff = (ps.x[ps.poison_idx].int() - x[ps.poison_idx].int())[..., inner]
    assert diff.abs().max() <= 16 and diff.abs().max() > 0
    corners = ps.x[ps.poison_idx][..., ~inner]
    assert torch.equal(corners, a.apply_uint8(ps.x[ps.poison_idx])[..., ~inner])  # the trigger is on top
    # the perturbation raises the surrogate's loss on the target images
    xt = x[ps.poison_idx].float() / 255
    with torch.no_grad():
        clean_loss = F.cross_entropy(a.surrogate(xt), y[ps.poison_idx])
        hard_loss = F.cross_entropy(a.surrogate(a.perturb(xt, y[ps.poison_idx])), y[ps.poison_idx])
    assert hard_loss > clean_loss
    assert 0 < a.fit_info["surrogate_fooled"] <= 1
    # the test set: the trigger alone, on non-target images, labelled with the target
    xs, ys = a.test_set(digits.x_test, digits.y_test)
    keep = digits.y_test != 2
    assert torch.equal(xs, a.apply_uint8(digits.x_test[keep])) and torch.all(ys == 2)


def test_surrogate_is_cached_in_process_and_on_disk_and_poisoning_is_deterministic(digits, monkeypatch):
    from safetensors.torch import load_file

    def poisoned(**kw):
        a = LabelConsistent(digits.image_shape, 10, target=4, seed=3, steps=3, **{**TINY, **kw})
        a.fit_to(digits)
        return a, a.poison(digits.x_train, digits.y_train, 0.1, Splits(len(digits.y_train), 3)).x

    a1, x1 = poisoned()
    spec = a1.surrogate_spec(digits.name, digits.x_train, 10, data_fingerprint(digits))
    path = trigger_cache_path("label_consistent", spec)
    assert path.is_file() and path.name.startswith("label_consistent_")
    assert "w.classifier.weight" in load_file(str(path))
    def no_work(*a, **k):
        raise AssertionError("recomputed instead of reused")

    with monkeypatch.context() as mp:
        mp.setattr(LabelConsistent, "_train_surrogate", no_work)
        mp.setattr(LabelConsistent, "perturb", no_work)
        a2, x2 = poisoned()  # surrogate and perturbed images from this process
    assert torch.equal(x1, x2)
    with monkeypatch.context() as mp:
        mp.setattr(LabelConsistent, "_train_surrogate", no_work)
        _MEMORY.clear()
        a3, x3 = poisoned()  # surrogate from disk
    assert torch.equal(x1, x3)
    _MEMORY.clear()
    path.unlink()
    a4, x4 = poisoned()  # surrogate trained again: identical (seeded, 1 thread)
    assert torch.equal(x1, x4)
    _, x5 = poisoned(eps=4 / 255)  # same surrogate, smaller budget: other images
    assert not torch.equal(x1, x5)


@pytest.mark.parametrize("kw,msg", [({"eps": -0.1}, "eps"), ({"eps": 2.0}, "eps"), ({"steps": 0}, "steps"),
                                    ({"steps": 2.5}, "steps"), ({"amplitude": 0.0}, "amplitude"),
                                    ({"amplitude": 1.5}, "amplitude"), ({"size": 0}, "size"), ({"size": 2.5}, "size"),
                                    ({"surrogate_epochs": 0}, "surrogate_epochs"), ({"eps": "big"}, "must be a number"),
                                    ({"mode": "all_to_all"}, "all-to-one"), ({"radius": 1}, "no parameter")])
def test_bad_settings_raise_config_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LabelConsistent((3, 8, 8), 10, **kw)


def test_perturb_before_fit_is_a_config_error():
    a = LabelConsistent((3, 8, 8), 10)
    with pytest.raises(ConfigError, match="fit_to"):
        a.perturb(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))


def test_cifar10_label_consistent_defaults_reach_high_asr_through_the_pipeline():
    """The issue's requirement: ASR >= 0.85 with the defaults, 2 epochs of fastnet; the pipeline's
    poison rate 0.1 covers every target-class image (the pool is capped)."""
    from conftest import real_dataset

    real_dataset("cifar10")
    from bdft_core.attacks import ATTACKS
    from bdft_core.pipeline import AttackConfig, run_attack

    ATTACKS.setdefault(LabelConsistent.name, LabelConsistent)
    t = time.perf_counter()
    run, _ = run_attack(AttackConfig(dataset="cifar10", attack="label_consistent"))
    print("label_consistent", run.final, run.attack["n_poisoned"], run.timings, f"{time.perf_counter() - t:.0f}s")
    assert run.attack["n_poisoned"] == 5000
    assert run.final["asr"] >= 0.85 and run.final["clean_acc"] > 0.6
