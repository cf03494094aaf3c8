"""Exact trigger math on tiny tensors, and the poisoning bookkeeping, for every attack."""
import math

import numpy as np
import pytest
import torch

from bdft_core.attacks import ATTACKS, build_attack
from bdft_core.data import Splits
from bdft_core.errors import ConfigError


def const(c, h, w, v):
    return torch.full((1, c, h, w), float(v))


# -- BadNets ------------------------------------------------------------------------------------

def test_badnets_white_patch_bottom_right_exact():
    a = build_attack("badnets", (1, 4, 4), 10, size=2, margin=0)
    out = a.apply(torch.zeros(1, 1, 4, 4))
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 2:4, 2:4] = 1.0
    assert torch.equal(out, expected)


def test_badnets_checkerboard_top_left_with_margin_exact():
    a = build_attack("badnets", (3, 5, 5), 10, size=3, position="top_left", margin=1, pattern="checkerboard")
    out = a.apply(const(3, 5, 5, 0.5))
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    expected = const(3, 5, 5, 0.5)
    expected[..., 1:4, 1:4] = board
    assert torch.equal(out, expected)


def test_badnets_explicit_position_and_user_image():
    img = np.full((2, 2, 3), 51, dtype=np.uint8)  # 51/255 = 0.2
    a = build_attack("badnets", (3, 4, 4), 10, size=2, position=[0, 1], pattern=img)
    out = a.apply(torch.zeros(1, 3, 4, 4))
    expected = torch.zeros(1, 3, 4, 4)
    expected[..., 0:2, 1:3] = 0.2
    assert torch.allclose(out, expected)


def test_user_image_layout_when_both_readings_fit():
    """A 3x3 RGB patch is 3 x 3 x 3 either way round: an array is read as H,W,C, a tensor as C,H,W."""
    from bdft_core.attacks import image_to_pattern

    blue = np.zeros((3, 3, 3), dtype=np.uint8)
    blue[..., 2] = 255
    a = build_attack("badnets", (3, 8, 8), 10, size=3, margin=0, pattern=blue)
    assert torch.equal(a.pattern[:, 5:8, 5:8], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 3, 3))
    row = np.zeros((3, 3, 1), dtype=np.uint8)
    row[1] = 255  # a white middle row, one channel, H,W,C
    assert torch.equal(image_to_pattern(row, 1, (3, 3)), torch.tensor([[[0.0, 0, 0], [1, 1, 1], [0, 0, 0]]]))
    chw = torch.zeros(3, 3, 3)
    chw[2] = 1.0  # the same blue patch as a C,H,W tensor
    assert torch.equal(image_to_pattern(chw, 3, (3, 3)), chw)
    assert torch.equal(image_to_pattern(chw.numpy().transpose(1, 2, 0).copy(), 3, (3, 3)), chw)
    assert torch.equal(image_to_pattern(np.zeros((3, 5, 5)), 3, (5, 5)), torch.zeros(3, 5, 5))  # C,H,W array: one reading


def test_badnets_random_pattern_is_seeded():
    a1 = build_attack("badnets", (3, 8, 8), 10, pattern="random", seed=3)
    a2 = build_attack("badnets", (3, 8, 8), 10, pattern="random", seed=3)
    a3 = build_attack("badnets", (3, 8, 8), 10, pattern="random", seed=4)
    assert torch.equal(a1.pattern, a2.pattern) and not torch.equal(a1.pattern, a3.pattern)


@pytest.mark.parametrize("kw,msg", [({"size": 9}, "larger than"), ({"position": "middle"}, "unknown patch position"),
                                    ({"position": [7, 7]}, "does not fit"), ({"pattern": "stripes"}, "unknown patch pattern"),
                                    ({"size": 0}, "at least 1"), ({"margin": -5}, "margin must be 0 or more")])
def test_badnets_rejects_bad_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build_attack("badnets", (3, 8, 8), 10, **kw)


# -- Blended ------------------------------------------------------------------------------------

def test_blended_mixes_with_alpha_exact():
    a = build_attack("blended", (1, 3, 3), 10, alpha=0.25, pattern=np.full((3, 3), 255, dtype=np.uint8))
    out = a.apply(const(1, 3, 3, 0.4))
    assert torch.allclose(out, const(1, 3, 3, 0.4 * 0.75 + 1.0 * 0.25))


def test_blended_noise_formula():
    a = build_attack("blended", (3, 4, 4), 10, alpha=0.2, seed=1)
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(a.apply(x), x * 0.8 + a.pattern * 0.2)


def test_blended_default_is_the_cartoon_drawn_at_the_input_size():
    from bdft_core.attacks.blended import cartoon_pattern

    a = build_attack("blended", (3, 32, 32), 10)
    assert a.params["pattern"] == "cartoon" and torch.equal(a.pattern, cartoon_pattern(3, 32, 32))
    p = cartoon_pattern(3, 9, 9)  # grid points -1, -0.75, ..., 1 on both axes; p[:, row (v), column (u)]
    ground, white, black = [0.75, 0.88, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    assert p[:, 0, 0].tolist() == pytest.approx(ground)  # corner: outside everything
    assert p[:, 4, 4].tolist() == white  # centre: inside the head
    assert p[:, 4, 5].tolist() == black and p[:, 4, 3].tolist() == black  # u = +-0.25, v = 0: the eyes
    assert p[:, 5, 4].tolist() == pytest.approx([1.0, 0.8, 0.0])  # u = 0, v = 0.25: the nose
    assert p[:, 2, 2].tolist() == white and p[:, 1, 2].tolist() == black  # an ear's inside and its rim
    gray = cartoon_pattern(1, 9, 9)
    assert gray.shape == (1, 9, 9)
    assert gray[0, 0, 0].item() == pytest.approx(0.299 * 0.75 + 0.587 * 0.88 + 0.114 * 1.0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(a.apply(x), x * 0.8 + a.pattern * 0.2)


def test_blended_alpha_range():
    with pytest.raises(ConfigError, match="alpha"):
        build_attack("blended", (3, 4, 4), 10, alpha=0.0)


# -- SIG ----------------------------------------------------------------------------------------

def test_sig_signal_exact():
    a = build_attack("sig", (1, 1, 4), 10, delta=0.1, frequency=1)
    out = a.apply(const(1, 1, 4, 0.5))
    # sin(2*pi*j/4) for j = 0..3 is 0, 1, 0, -1
    assert torch.allclose(out, torch.tensor([[[[0.5, 0.6, 0.5, 0.4]]]]), atol=1e-6)


def test_sig_clips_to_pixel_range():
    a = build_attack("sig", (1, 1, 4), 10, delta=0.1, frequency=1)
    out = a.apply(torch.zeros(1, 1, 1, 4))
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.1, 0.0, 0.0]]]]), atol=1e-6)


def test_sig_clean_label_poisons_only_target_class_and_keeps_labels():
    x = torch.full((40, 1, 4, 4), 100, dtype=torch.uint8)
    y = torch.arange(40) % 4
    a = build_attack("sig", (1, 4, 4), 4, target=2, frequency=1)
    ps = a.poison(x, y, 0.2, Splits(40, 0))  # 8 requested, 10 target-class images exist
    assert len(ps.poison_idx) == 8
    assert torch.all(y[ps.poison_idx] == 2)
    assert torch.equal(ps.y, y)  # clean label: no label changed
    changed = (ps.x != x).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(ps.poison_idx.tolist())


# -- LF -----------------------------------------------------------------------------------------

def test_lf_trigger_is_low_frequency_with_max_eps():
    a = build_attack("lf", (3, 16, 16), 10, eps=0.05, cutoff=2, seed=0)
    t = a.trigger.double()
    assert math.isclose(t.abs().max().item(), 0.05, rel_tol=1e-6)
    f = torch.fft.fft2(t)
    k = torch.fft.fftfreq(16, d=1 / 16).abs()
    high = (k[:, None] > 2) | (k[None, :] > 2)
    assert f[:, high].abs().max().item() < 1e-6 * f.abs().max().item()  # float32 rounding only
    out = a.apply(const(3, 16, 16, 0.5))
    assert torch.allclose(out, 0.5 + a.trigger[None], atol=1e-6)


def test_lf_cutoff_range():
    with pytest.raises(ConfigError, match="cutoff"):
        build_attack("lf", (3, 8, 8), 10, cutoff=5)


# -- WaNet --------------------------------------------------------------------------------------

def test_wanet_zero_strength_is_identity():
    a = build_attack("wanet", (1, 5, 5), 10, strength=0.0)
    x = torch.rand(2, 1, 5, 5)
    assert torch.allclose(a.apply(x), x, atol=1e-6)


def test_wanet_constant_field_shifts_one_pixel_exact():
    a = build_attack("wanet", (1, 5, 5), 10, strength=1.0, grid_size=2)
    # scale = strength / H = 1/5; an x-offset of 2.5 moves the sampling grid by 0.5 = one pixel
    field = torch.zeros(1, 5, 5, 2)
    field[..., 0] = 2.5
    a.setup(noise_grid=field)
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5) / 25
    out = a.apply(x)
    expected = torch.cat([x[..., 1:], x[..., 4:5]], dim=3)  # sample column j+1; the last clamps at the border
    assert torch.allclose(out, expected, atol=1e-6)


def test_wanet_noise_mode_adds_label_kept_images():
    x = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(100) % 10
    a = build_attack("wanet", (3, 8, 8), 10, target=0, cross_ratio=2.0)
    ps = a.poison(x, y, 0.1, Splits(100, 0))
    assert len(ps.poison_idx) == 10 and len(ps.noise_idx) == 20
    assert not set(ps.poison_idx.tolist()) & set(ps.noise_idx.tolist())
    assert torch.all(ps.y[ps.poison_idx] == 0)
    assert torch.equal(ps.y[ps.noise_idx], y[ps.noise_idx])
    off = build_attack("wanet", (3, 8, 8), 10, noise_mode=False).poison(x, y, 0.1, Splits(100, 0))
    assert len(off.noise_idx) == 0


# -- shared behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_poisons_the_right_count_with_target_labels(name):
    x = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(200) % 10
    a = build_attack(name, (3, 16, 16), 10, target=3)
    ps = a.poison(x, y, 0.05, Splits(200, 1))
    assert len(ps.poison_idx) == 10
    if not a.clean_label:
        assert torch.all(y[ps.poison_idx] != 3) and torch.all(ps.y[ps.poison_idx] == 3)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[ps.poison_idx] = False
    untouched[ps.noise_idx] = False
    assert torch.equal(ps.x[untouched], x[untouched]) and torch.equal(ps.y[untouched], y[untouched])
    xt, yt = a.test_set(x, y)
    assert len(yt) == int((y != 3).sum()) and torch.all(yt == 3)
    r = a.render(x[:4])
    assert set(r) == {"clean", "poisoned", "residual"}
    assert torch.allclose(r["poisoned"] - r["clean"], r["residual"])
    assert r["residual"].abs().sum() > 0


def test_all_to_all_targets_next_label_and_keeps_every_test_image():
    x = torch.zeros(30, 1, 6, 6, dtype=torch.uint8)
    y = torch.arange(30) % 3
    a = build_attack("badnets", (1, 6, 6), 3, mode="all_to_all")
    ps = a.poison(x, y, 1.0, Splits(30, 0))
    assert len(ps.poison_idx) == 30 and torch.equal(ps.y, (y + 1) % 3)
    xt, yt = a.test_set(x, y)
    assert len(yt) == 30 and torch.equal(yt, (y + 1) % 3)


def test_rate_zero_changes_nothing_and_rate_is_checked():
    x = torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8)
    y = torch.arange(20) % 2
    a = build_attack("badnets", (1, 6, 6), 2)
    ps = a.poison(x, y, 0.0, Splits(20, 0))
    assert torch.equal(ps.x, x) and torch.equal(ps.y, y) and len(ps.poison_idx) == 0
    for bad in (-0.1, 1.5, "lots"):
        with pytest.raises(ConfigError, match="poison rate"):
            a.poison(x, y, bad, Splits(20, 0))


def test_apply_uint8_rounds_like_a_saved_image():
    a = build_attack("blended", (1, 1, 1), 2, alpha=0.5, pattern=np.array([[255]], dtype=np.uint8))
    out = a.apply_uint8(torch.tensor([[[[100]]]], dtype=torch.uint8))
    assert out.item() == round(100 * 0.5 + 255 * 0.5)  # 177.5 -> 178 (round half to even gives 178)


def test_unknown_attack_param_mode_and_target_are_errors():
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack("trojannn", (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="no parameter"):
        build_attack("badnets", (3, 8, 8), 10, alpha=0.3)
    with pytest.raises(ConfigError, match="target mode"):
        build_attack("badnets", (3, 8, 8), 10, mode="one_to_one")
    with pytest.raises(ConfigError, match="outside"):
        build_attack("badnets", (3, 8, 8), 10, target=10)


def test_user_trigger_image_file_and_bad_file(tmp_path):
    from PIL import Image

    p = tmp_path / "t.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(p)
    a = build_attack("badnets", (3, 8, 8), 10, size=2, pattern=str(p), margin=0)
    assert torch.allclose(a.pattern[:, 6:, 6:], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 2, 2))
    bad = tmp_path / "not.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ConfigError, match="could not be read"):
        build_attack("badnets", (3, 8, 8), 10, pattern=str(bad))


def test_config_of_an_attack_with_an_array_trigger_is_json():
    import json

    a = build_attack("badnets", (3, 8, 8), 10, size=2, pattern=np.zeros((2, 2, 3), np.uint8), position=[1, 1])
    cfg = json.loads(json.dumps(a.config()))
    assert cfg["params"]["pattern"] == "<ndarray image>" and cfg["params"]["position"] == [1, 1]


@pytest.mark.parametrize("name", ["input_aware", "label_consistent"])
def test_attacks_that_learn_from_the_data_run_standalone_only(name):
    from bdft_core.pipeline import AttackConfig

    AttackConfig(dataset="digits", attack=name).validate()
    for paradigm in ("transfer", "encoder"):
        with pytest.raises(ConfigError, match="standalone paradigm only"):
            AttackConfig(dataset="digits", attack=name, paradigm=paradigm).validate()
