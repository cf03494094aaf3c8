"""Attribution maps and their metrics (bdft_core.explain): exact numbers on hand-built models and maps,
the layer rule on the real architectures, and one quickly trained BadNets digits model."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from bdft_core.attacks import build_attack
from bdft_core.errors import ConfigError
from bdft_core.explain import (METHODS, GradCAM, IntegratedGradients, Saliency, attribute, center_of_mass,
                               center_shift, conv_layers, default_layer, explain_models, map_shift, overlay,
                               region_share, trigger_region)
from bdft_core.models import build_model


class Gate(nn.Module):
    """Multiplies by a fixed spatial mask: only the masked cells of the block's output are non-zero."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask.float())

    def forward(self, a):
        return a * self.mask


class GatedNet(nn.Module):
    """logit 0 = sum(block(x)), logit 1 = -logit 0, where block = a 1x1 conv with weights ``w`` (one per
    input channel) followed by a gate: only the pixels in ``region`` reach the logits."""

    def __init__(self, region, w=(2.0,)):
        super().__init__()
        conv = nn.Conv2d(len(w), 1, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(w).view(1, -1, 1, 1))
        self.block = nn.Sequential(conv, Gate(region))

    def forward(self, x):
        s = self.block(x).sum((1, 2, 3))
        return torch.stack([s, -s], 1)


def corner_region(n=8, k=3):
    r = torch.zeros(n, n, dtype=torch.bool)
    r[n - k:, n - k:] = True
    return r


def test_gradcam_mass_sits_exactly_on_the_gated_region():
    region = corner_region()
    model = GatedNet(region)  # block output = 2 * x on the region, 0 elsewhere; d logit0 / d output = 1
    x = torch.ones(2, 1, 8, 8)
    cam = GradCAM(model, "block").attribute(x, target=0)
    # Grad-CAM: weight = mean gradient = 1, map = relu(1 * 2 * x * region) = 2 on the region, 0 off it
    assert cam.shape == (2, 8, 8)
    assert torch.equal(cam, 2.0 * region.float().expand(2, 8, 8))
    assert torch.equal(region_share(cam, region), torch.ones(2))
    # the other class has weight -1, so the rectified map is empty: its share is 0 by definition
    cam1 = GradCAM(model, "block").attribute(x, target=1)
    assert torch.equal(cam1, torch.zeros(2, 8, 8))
    assert torch.equal(region_share(cam1, region), torch.zeros(2))
    # target None = the prediction (class 0 here, as the logit is +18)
    assert torch.equal(GradCAM(model, "block").attribute(x), cam)


def test_gradcam_upsampling_is_bilinear_from_the_layer_size():
    # a stride-2 2x2 averaging conv makes the layer 4x4; the gate keeps only the bottom-right cell
    cell = torch.zeros(4, 4)
    cell[3, 3] = 1
    conv = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.25)
    model = GatedNet(corner_region())
    model.block = nn.Sequential(conv, Gate(cell))
    cam = GradCAM(model, model.block).attribute(torch.ones(1, 1, 8, 8), target=0)[0]
    # bilinear (align_corners=False) 4 -> 8, per axis: output 7 takes cell 3 fully, 6 takes 0.75, 5 takes 0.25
    axis = torch.tensor([0, 0, 0, 0, 0, 0.25, 0.75, 1.0])
    assert torch.allclose(cam, axis[:, None] * axis[None, :])
    # share inside the 2x2 corner patch = (1.75 / 2) ** 2
    assert region_share(cam, corner_region(8, 2)).item() == pytest.approx(0.765625, abs=1e-6)


def test_saliency_is_the_absolute_weight_on_the_region():
    region = corner_region()
    model = GatedNet(region, w=(2.0, -1.0, 0.5))
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    sal = attribute(model, x, "saliency", target=0)
    # d logit0 / d x_c = w_c on the region: |2| + |-1| + |0.5| = 3.5 whatever the image
    assert torch.allclose(sal, 3.5 * region.float().expand(3, 8, 8))
    assert torch.allclose(region_share(sal, region), torch.ones(3))


def test_integrated_gradients_is_input_times_weight_for_a_linear_model():
    region = corner_region()
    model = GatedNet(region, w=(2.0, -1.0, 0.5))
    x = torch.full((2, 3, 8, 8), 51, dtype=torch.uint8)  # 0.2 everywhere
    ig = attribute(model, x, "integrated_gradients", target=0, n_steps=4)
    # linear model, black baseline: IG_c = x_c * w_c exactly; |.| summed = 0.2 * 3.5 on the region
    assert torch.allclose(ig, 0.7 * region.float().expand(2, 8, 8), atol=1e-5)


def test_attribution_leaves_the_model_as_it_found_it():
    torch.manual_seed(0)
    model = build_model("fastnet", 10, 3, widths=[8, 8, 8])
    model.train()
    model.body[2][2].eval()  # a module with its own mode must keep it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # gradients are switched on inside, whatever the caller does
        maps = {m: attribute(model, x, m, n_steps=4) if m == "integrated_gradients" else attribute(model, x, m)
                for m in METHODS}
    for m, a in maps.items():
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and bool((a >= 0).all()), m
        assert bool(torch.isfinite(a).all()), m
        assert m == "gradcam" or a.sum() > 0, m  # an untrained net's rectified Grad-CAM may be empty
    assert model.training and not model.body[2][2].training and model.body[3][2].training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics untouched


def test_layers_and_the_default_layer_rule():
    fast = build_model("fastnet", 10, 3, widths=[8, 8, 8])
    layers = {n: s for n, _, s in conv_layers(fast, (3, 32, 32))}
    assert layers["body.0"] == (31, 31) and layers["body.2"] == (16, 16)
    assert layers["body.3"] == (8, 8) and layers["body.4"] == (4, 4)
    assert "body" not in layers  # the whole body ends flat
    name = default_layer(fast, (3, 32, 32))
    assert name == "body.3" and min(layers[name]) >= 8
    assert default_layer(build_model("resnet18", 10, 3, width=8), (32, 32)) == "body.6"
    # 8x8 digits: a cell may span 2x2 pixels, and the 1x1 last block is not a spatial layer
    assert default_layer(build_model("fastnet", 10, 1, widths=[8, 8, 8]), (1, 8, 8)) == "body.3"
    assert default_layer(GatedNet(corner_region()), (1, 8, 8)) == "block"  # the stage, not its inner conv
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        GradCAM(fast, "nope")


def test_region_share_on_hand_made_maps():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.allclose(region_share(maps, mask), torch.tensor([0.5, 0.0, 0.0]))  # (1+4)/10; empty map -> 0
    soft = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    assert torch.allclose(region_share(maps, soft), torch.tensor([0.2, 0.0, 0.5]))  # (1 + 1)/10; 2.5/5
    assert region_share(maps[0], mask).shape == (1,)
    with pytest.raises(ConfigError, match="does not match"):
        region_share(maps, torch.ones(3, 3))


def test_map_shift_and_center_shift_on_hand_made_maps():
    a = torch.zeros(5, 4, 5)
    b = torch.zeros(5, 4, 5)
    a[0, 1, 1], b[0, 1, 1] = 1.0, 7.0  # same place, other scale: no shift
    a[1, 0, 0], b[1, 3, 4] = 1.0, 1.0  # disjoint: shift 1, centres 3-4-5 apart
    a[2, 0, 0], b[2, 0, 0], b[2, 0, 1] = 1.0, 1.0, 1.0  # cos = 1/sqrt(2); centres half a pixel apart
    b[3, 2, 2] = 1.0  # a empty, b not
    shift = map_shift(a, b)  # pair 4: both empty
    assert torch.allclose(shift, torch.tensor([0.0, 1.0, 1 - 1 / math.sqrt(2), 1.0, 0.0]), atol=1e-6)
    cs = center_shift(a, b)
    assert torch.allclose(cs[:3], torch.tensor([0.0, 5.0, 0.5]), atol=1e-6)
    assert torch.isnan(cs[3:]).all()
    m = torch.zeros(1, 3, 3)
    m[0, 0, 0], m[0, 2, 0], m[0, 2, 2] = 1.0, 1.0, 2.0
    assert torch.allclose(center_of_mass(m), torch.tensor([[1.5, 1.0]]))  # rows (0+2+4)/4, cols (0+0+4)/4


def test_trigger_region_follows_the_attack_mask():
    bad = build_attack("badnets", (3, 32, 32), 10)
    region = trigger_region(bad, (3, 32, 32))
    assert region.dtype == torch.bool and region.shape == (32, 32)
    assert torch.equal(region, bad.mask[0] > 0)
    assert int(region.sum()) == 9 and bool(region[28:31, 28:31].all())  # 3x3, 1 pixel from the corner
    assert torch.equal(trigger_region(bad, (32, 32)), region)
    assert trigger_region(build_attack("blended", (3, 32, 32), 10), (3, 32, 32)) is None  # a blend: everywhere
    assert trigger_region(build_attack("wanet", (3, 32, 32), 10), (3, 32, 32)) is None  # no mask at all
    assert trigger_region(build_attack("badnets", (3, 32, 32), 10, size=17), (3, 32, 32)) is None  # >= 25%
    with pytest.raises(ConfigError, match="does not match"):
        trigger_region(bad, (3, 16, 16))


def test_explain_models_structure():
    torch.manual_seed(0)
    models = {k: build_model("fastnet", 10, 3, widths=[8, 8, 8]) for k in ("a", "b")}
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bad = build_attack("badnets", (3, 32, 32), 10, target=2)
    res = explain_models(models, x, bad, "gradcam")
    assert res["method"] == "gradcam" and res["n"] == 4 and res["image_shape"] == (3, 32, 32)
    assert torch.equal(res["x_triggered"], bad.apply_uint8(x)) and int(res["region"].sum()) == 9
    assert res["region_area"] == pytest.approx(9 / 1024)
    assert [r["model"] for r in res["rows"]] == ["a", "b"]
    for r in res["models"].values():
        assert r["layer"] == "body.3" and r["layer_size"] == (8, 8)
        assert r["maps_clean"].shape == r["maps_triggered"].shape == (4, 32, 32)
        for k in ("share_clean", "share_triggered", "map_shift", "center_shift"):
            assert r[k].shape == (4,)
        assert 0 <= r["mean"]["share_triggered"] <= 1 and 0 <= r["mean"]["flip_rate"] <= 1
        assert torch.equal(r["target_clean"], r["pred_clean"])
    res = explain_models(models, x, build_attack("blended", (3, 32, 32), 10), "saliency", target="backdoor")
    r = res["models"]["a"]
    assert res["region"] is None and res["region_area"] is None
    assert r["share_clean"] is None and r["mean"]["share_clean"] is None
    assert r["layer"] is None and bool((r["target_triggered"] == 0).all())
    with pytest.raises(ConfigError, match="unknown attribution method"):
        explain_models(models, x, bad, "lime")


def test_overlay_colours_only_where_the_map_is():
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    img[0] = 200
    heat = torch.zeros(4, 4)
    heat[1, 2] = 5.0
    out = overlay(img, heat, alpha=0.6)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert (out[0, 0] == [200, 0, 0]).all()  # map 0: the image unchanged
    # map at its maximum: 0.4 * image + 0.6 * yellow
    assert (out[1, 2] == [round(0.4 * 200 + 0.6 * 255), round(0.6 * 255), 0]).all()
    gray = overlay(np.full((1, 4, 4), 10, np.uint8), np.zeros((2, 2)))
    assert gray.shape == (4, 4, 3) and (gray == 10).all()


def test_a_trained_badnets_model_looks_at_the_patch():
    """Digits (8x8), a 2x2 BadNets patch in the corner: on triggered images the attribution mass moves
    onto the patch (which covers 1/16 of the pixels)."""
    from bdft_core.pipeline import AttackConfig, prepare, run_attack

    cfg = AttackConfig(dataset="digits", model_kwargs={"widths": [16, 16, 16]}, epochs=4,
                       params={"size": 2, "margin": 0})
    run, model = run_attack(cfg)
    assert run.final["asr"] > 0.8
    s = prepare(cfg)
    x = s.data.x_test[s.data.y_test != 0][:64]
    res = explain_models({"poisoned": model}, x, s.attack, "integrated_gradients")
    mean = res["models"]["poisoned"]["mean"]
    assert mean["share_clean"] < 0.1 and mean["share_triggered"] > 0.4
    assert mean["map_shift"] > 0.3
