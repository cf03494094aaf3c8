"""Backdoor sequela axes: exact numbers on hand-made inputs (AUC, advantage, ECE, membership scores),
each axis's behaviour and orientation (higher = more vulnerable) on tiny digits models, the registry,
evaluate/radar, and the context built from a stored run."""
import threading

import pytest
import torch
from torch import nn

from bdft_core.errors import ConfigError
from bdft_core.sequela import (AXES, SequelaContext, axis_names, build_axis, evaluate, radar_axes, radar_figure)
from bdft_core.sequela.adversarial import FGSM, PGD, pgd
from bdft_core.sequela.base import advantage, fit, roc_auc, state_key
from bdft_core.sequela.calibration import Calibration, calibration_errors
from bdft_core.sequela.membership import ThresholdMIA, membership_scores
from bdft_core.sequela.reinjection import Reinjection
from bdft_core.sequela.shadow_mia import ShadowMIA
from bdft_core.sequela.stealing import Stealing


# -- exact numbers -------------------------------------------------------------------------------

def test_auc_and_advantage_exact():
    s_in, s_out = [0.9, 0.8, 0.4], [0.7, 0.3, 0.2]
    assert roc_auc(s_in, s_out) == pytest.approx(8 / 9)  # 8 of the 9 pairs ordered right
    assert advantage(s_in, s_out) == pytest.approx(2 / 3)  # threshold 0.8: TPR 2/3, FPR 0
    assert roc_auc([1, 1], [1, 0]) == pytest.approx(0.75)  # ties count one half
    assert advantage([1, 1], [1, 0]) == pytest.approx(0.5)
    assert roc_auc([0, 0], [1, 1]) == 0.0 and advantage([0, 0], [1, 1]) == 0.0  # reversed score: no advantage
    assert roc_auc([3.0], [1.0, 2.0]) == 1.0 and advantage([3.0], [1.0, 2.0]) == 1.0


def test_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score, roc_curve

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 7, (300,), generator=g).float()
    b = torch.randint(0, 5, (200,), generator=g).float()
    y = [1] * 300 + [0] * 200
    s = torch.cat([a, b]).numpy()
    assert roc_auc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert advantage(a, b) == pytest.approx(float((tpr - fpr).max()), abs=1e-12)


def test_ece_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.25, 0.75], [0.55, 0.45]])
    y = torch.tensor([0, 1, 1, 1])
    r = calibration_errors(probs, y, n_bins=15)
    # bins (b/15, (b+1)/15]: 0.9 -> bin 13 (acc 1/2, conf 0.9), 0.75 -> bin 11 (acc 1), 0.55 -> bin 8 (acc 0)
    assert r["ece"] == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.25 + 1 / 4 * 0.55)  # 0.4
    assert r["mce"] == pytest.approx(0.55)
    assert r["accuracy"] == pytest.approx(0.5) and r["mean_confidence"] == pytest.approx((0.9 + 0.9 + 0.75 + 0.55) / 4)
    perfect = calibration_errors(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert perfect["ece"] == 0.0  # confidence 1 lands in the last bin, and is right


def test_membership_scores_exact():
    lp = torch.tensor([[0.5, 0.25, 0.25]]).log()
    s = membership_scores(lp, torch.tensor([0]))
    ln = torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert s["loss"].item() == pytest.approx(-ln.item())
    assert s["confidence"].item() == pytest.approx(0.5)
    assert s["entropy"].item() == pytest.approx(-1.5 * ln.item())
    # Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i) = 0.5 ln 2 + 0.5 ln(4/3)
    mentr = 0.5 * ln.item() + 0.5 * torch.log(torch.tensor(4 / 3, dtype=torch.float64)).item()
    assert s["mentropy"].item() == pytest.approx(-mentr)


# -- registry and validation ---------------------------------------------------------------------

def test_registry_and_validation_errors():
    # the shipped axes, in this order; an axis added later goes after them (one file, one entry, one test)
    assert axis_names()[:7] == ["membership", "shadow_mia", "reinjection", "pgd", "fgsm", "stealing", "calibration"]
    for name, cls in AXES.items():
        a = build_axis(name.upper())  # names are case-insensitive
        assert isinstance(a, cls) and a.params == cls.get_default_config()
        assert cls.title and cls.paper and cls.meaning and set(cls.help) == set(cls.defaults)
        lo, hi = cls.range
        assert lo < hi
    with pytest.raises(ConfigError, match="unknown sequela axis 'nope'"):
        build_axis("nope")
    with pytest.raises(ConfigError, match="no parameter"):
        build_axis("pgd", alpha=1)
    with pytest.raises(ConfigError, match="eps"):
        build_axis("pgd", eps=0)
    with pytest.raises(ConfigError, match="pixel units"):
        build_axis("fgsm", eps=8)
    with pytest.raises(ConfigError, match="labels"):
        build_axis("stealing", labels="probabilities")
    with pytest.raises(ConfigError, match="n_clean"):
        build_axis("reinjection", n_clean=-1)
    with pytest.raises(ConfigError, match="steps"):
        build_axis("reinjection", steps=2.5)
    with pytest.raises(ConfigError, match="n_pool"):
        build_axis("shadow_mia", n_pool=2)
    with pytest.raises(ConfigError, match="n_bins"):
        build_axis("calibration", n_bins=0)


# -- tiny digits models --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The 8x8 digits models are too small for two threads to pay (3x slower here); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Digits split: train[:600] the main models' training set, train[600:700] the overfit model's,
    train[800:] the attacker's pool; test[:150] non-members, test[150:] held out."""
    from bdft_core.attacks import build_attack
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    d = load_dataset("digits")
    atk = build_attack("badnets", (1, 8, 8), 10, size=2, target=0)

    def new_model():
        m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
        m.fit_data(d.x_train[800:])
        return m

    def trained(x, y, epochs, seed, lr=0.1, batch_size=64):
        torch.manual_seed(seed)
        m = new_model()
        fit(m, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, flip=False)
        return m.eval()

    x, y = d.x_train[:600], d.y_train[:600]
    xp, yp = x.clone(), y.clone()
    idx = torch.nonzero(y != 0).squeeze(1)[:60]  # 10% poisoned, relabelled to 0
    xp[idx], yp[idx] = atk.apply_uint8(x[idx]), 0
    torch.manual_seed(5)
    models = {"clean": trained(x, y, 10, 0), "poisoned": trained(xp, yp, 10, 0),
              "overfit": trained(d.x_train[600:700], d.y_train[600:700], 60, 1, lr=0.2, batch_size=50),
              "untrained": new_model().eval()}

    def ctx(members=slice(0, 600), **kw):
        kw = {"attack": atk, "new_model": new_model, "seed": 0, **kw}
        return SequelaContext(d.x_train[members], d.y_train[members], d.x_test[:150], d.y_test[:150],
                              d.x_train[800:], d.y_train[800:], d.x_test[150:], d.y_test[150:], **kw)

    return {"data": d, "attack": atk, "models": models, "ctx": ctx}


def test_threshold_mia_detects_overfit_members(digits):
    ctx = digits["ctx"](members=slice(600, 700))
    m = digits["models"]
    over = ThresholdMIA(n=100).measure(m["overfit"], ctx)
    base = ThresholdMIA(n=100).measure(m["untrained"], ctx)
    assert over["raw"]["train_acc"] > 0.95 and over["raw"]["generalization_gap"] > 0.1
    assert over["value"] > 0.7 and over["value"] == max(over["raw"][f"{k}_auc"] for k in
                                                        ("loss", "confidence", "entropy", "mentropy"))
    assert over["raw"]["advantage"] > 0.3
    assert abs(base["value"] - 0.5) < 0.15  # an untrained model knows nothing of "its" members
    assert over["value"] > base["value"] + 0.2  # orientation: the leakier model scores higher
    assert over["seconds"] >= 0 and not over["stopped"]


def test_shadow_mia_orientation_and_shared_shadows(digits):
    ctx = digits["ctx"](members=slice(600, 700))
    m = digits["models"]
    axis = ShadowMIA(n=100, n_pool=300, epochs=40.0, batch_size=50, n_shadow_models=2)
    assert not axis.is_prepared(ctx)
    over = axis.measure(m["overfit"], ctx)
    assert axis.is_prepared(ctx)  # the shadow models are kept for the next model
    base = axis.measure(m["untrained"], ctx)
    assert over["raw"]["shadow_train_acc"] > over["raw"]["shadow_test_acc"]  # the shadows did overfit
    assert over["raw"]["shadow_auc"] > 0.7
    assert over["value"] > 0.6 and over["value"] > base["value"] + 0.1, (over["value"], base["value"])
    assert base["seconds"] < over["seconds"]  # shadow training counted once, where it happened


def test_pgd_stays_within_eps_and_beats_fgsm(digits):
    d, model = digits["data"], digits["models"]["clean"]
    x = d.x_test[:64].float() / 255
    y = d.y_test[:64]
    eps = 0.1
    adv = pgd(model, x, y, eps, 0.025, 10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max().item() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ctx = digits["ctx"]()
    before = state_key(model)
    p = PGD(eps=eps, step_size=0.025).measure(model, ctx)
    f = FGSM(eps=eps).measure(model, ctx)
    assert p["raw"]["max_perturbation"] <= eps + 1e-6 and f["raw"]["max_perturbation"] <= eps + 1e-6
    assert p["raw"]["n_attacked"] == f["raw"]["n_attacked"] > 100  # the same correctly classified images
    assert p["value"] > f["value"] > 0
    weak = PGD(eps=0.02, step_size=0.005).measure(model, ctx)
    assert weak["value"] < p["value"]  # orientation: a larger budget flips more, and scores higher
    assert model.training is False and state_key(model) == before  # the model is left as it was


def test_reinjection_raises_asr_and_leaves_the_model_alone(digits):
    ctx = digits["ctx"]()
    clean, poisoned = digits["models"]["clean"], digits["models"]["poisoned"]
    before = state_key(clean)
    axis = Reinjection(n_poison=10, n_clean=100, steps=20, lr=0.02, n_eval=200)
    rc = axis.measure(clean, ctx)
    assert state_key(clean) == before  # a copy was tuned
    assert rc["raw"]["asr_before"] < 0.1 and rc["raw"]["asr_after"] > rc["raw"]["asr_before"] + 0.1  # about 0.01 -> 0.4
    assert rc["value"] == rc["raw"]["asr_after"] and rc["raw"]["steps"] == 20 and rc["raw"]["n_poison"] == 10
    rp = axis.measure(poisoned, ctx)
    assert rp["raw"]["asr_before"] > 0.8 and rp["value"] > rc["value"] + 0.3  # orientation: backdoored scores higher
    none = axis.measure(clean, digits["ctx"](attack=None))
    assert none["value"] is None and "skipped" in none["raw"]


def test_stealing_fidelity_above_chance_and_orientation(digits):
    ctx = digits["ctx"]()
    axis = Stealing(budget=600, epochs=8.0, batch_size=64)
    r = axis.measure(digits["models"]["clean"], ctx)
    assert r["raw"]["chance"] == pytest.approx(0.1)
    assert r["value"] > 0.4 and r["value"] == r["raw"]["fidelity"]
    hard = Stealing(budget=600, epochs=8.0, batch_size=64, labels="hard").measure(digits["models"]["clean"], ctx)
    assert hard["value"] > 0.3

    class Constant(nn.Module):  # always answers class 3: trivially copied
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            out = torch.full((len(x), 10), -5.0) + 0 * self.w
            out[:, 3] = 5.0
            return out

    assert axis.measure(Constant(), ctx)["value"] == 1.0 >= r["value"]  # orientation: easier to copy = higher


def test_calibration_orientation(digits):
    ctx = digits["ctx"]()
    model = digits["models"]["clean"]

    class Sharpened(nn.Module):  # the same predictions, far more confident
        def __init__(self, m, t):
            super().__init__()
            self.m, self.t = m, t

        def forward(self, x):
            return self.m(x) / self.t

    base = Calibration().measure(model, ctx)
    hot = Calibration().measure(Sharpened(model, 0.05), ctx)
    cold = Calibration().measure(Sharpened(model, 20.0), ctx)  # near-uniform: badly underconfident
    assert hot["raw"]["accuracy"] == base["raw"]["accuracy"]
    assert hot["raw"]["overconfidence"] > base["raw"]["overconfidence"]
    assert cold["value"] > base["value"] and cold["raw"]["overconfidence"] < 0


def test_outputs_are_never_served_to_a_different_object_with_the_same_weights(digits):
    """Wrappers differ by settings that are not in their weights (a temperature): each object gets
    its own outputs, also when a freed wrapper's memory (and so its id()) goes to the next one."""
    import gc

    ctx = digits["ctx"]()
    model = digits["models"]["clean"]

    class Scaled(nn.Module):
        def __init__(self, m, t):
            super().__init__()
            self.m, self.t = m, t

        def forward(self, x):
            return self.m(x) / self.t

    model.eval()
    with torch.no_grad():
        want = {t: torch.log_softmax(model(ctx.x_test[:50].float() / 255) / t, 1) for t in (0.05, 20.0)}
    for t in (0.05, 20.0, 0.05, 20.0):  # each wrapper is freed before the next is made
        got = ctx.log_probs(Scaled(model, t), "test", 50)
        assert torch.allclose(got, want[t], rtol=1e-4, atol=1e-4)
        gc.collect()
    assert len(ctx.outputs) == 0  # the freed wrappers' entries went with them
    w = Scaled(model, 2.0)
    first = ctx.log_probs(w, "test", 20)
    assert ctx.log_probs(w, "test", 20) is not None and torch.equal(ctx.log_probs(w, "test", 10), first[:10])
    assert len(ctx.outputs) == 1


# -- evaluate, radar ------------------------------------------------------------------------------

def test_evaluate_same_data_for_every_model_and_radar(digits):
    ctx = digits["ctx"]()
    models = {"clean": digits["models"]["clean"], "poisoned": digits["models"]["poisoned"]}
    axes = ["membership", "fgsm", "calibration", "reinjection"]
    params = {"reinjection": {"n_eval": 100, "steps": 5}}
    seen = []
    res = evaluate(models, ctx, axes=axes, params=params, progress=lambda f, msg: seen.append(f))
    assert res["axes"] == axes and res["models"] == ["clean", "poisoned"] and not res["stopped"]
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    for m in models:
        for a in axes:
            r = res["results"][m][a]
            assert set(r) == {"value", "raw", "seconds", "stopped"} and r["value"] is not None
    assert res["params"]["reinjection"]["steps"] == 5 and res["params"]["fgsm"] == FGSM.defaults
    again = evaluate(models, ctx, axes=axes, params=params)  # same context, same seed: the same numbers
    assert all(again["results"][m][a]["value"] == res["results"][m][a]["value"] for m in models for a in axes)
    assert len(ctx.outputs) == 0  # per-model outputs are dropped afterwards

    r = radar_axes(res)
    assert r["axes"] == axes and r["ranges"][0] == [0.5, 1.0]
    mem = res["results"]["clean"]["membership"]["value"]
    assert r["models"]["clean"][0] == pytest.approx(min(1, max(0, (mem - 0.5) / 0.5)))
    assert all(0 <= v <= 1 for m in r["models"].values() for v in m)
    mm = radar_axes(res, scale="minmax")
    for j in range(len(axes)):
        col = sorted(mm["models"][m][j] for m in models)
        assert col == [0.5, 0.5] or col == [0.0, 1.0]
    fig = radar_figure(res)
    assert len(fig.data) == 2 and fig.data[0].type == "scatterpolar"
    with pytest.raises(ConfigError, match="scale"):
        radar_axes(res, scale="log")


def test_radar_fixed_ranges_on_a_hand_made_result():
    res = {"axes": ["membership", "pgd", "calibration"], "models": ["a", "b"],
           "results": {"a": {"membership": {"value": 0.75}, "pgd": {"value": 0.2}, "calibration": {"value": 0.6}},
                       "b": {"membership": {"value": 0.4}, "pgd": {"value": None}, "calibration": {"value": 0.03}}}}
    r = radar_axes(res)
    assert r["models"]["a"] == pytest.approx([0.5, 0.2, 1.0])  # ECE 0.6 beyond 0..0.3: clipped
    assert r["models"]["b"][0] == 0.0 and r["models"]["b"][1] is None and r["models"]["b"][2] == pytest.approx(0.1)
    mm = radar_axes(res, scale="minmax")
    assert mm["models"]["a"] == [1.0, 0.5, 1.0] and mm["models"]["b"] == [0.0, None, 0.0]
    fig = radar_figure(res)  # b has no PGD value: its polygon skips that axis instead of dipping to 0
    a, b = fig.data
    assert list(a.theta) == [t for t in r["titles"]] + r["titles"][:1] and list(a.r)[:3] == pytest.approx([0.5, 0.2, 1.0])
    assert list(b.theta) == [r["titles"][0], r["titles"][2], r["titles"][0]] and list(b.r) == pytest.approx([0.0, 0.1, 0.0])
    assert list(fig.layout.polar.angularaxis.categoryarray) == r["titles"]  # axis order kept despite the gap
    from bdft_core import figures

    res["models"] = ["poisoned", "sft"]  # the dashboard's names: the same labels and colours as its other pages
    res["results"] = {"poisoned": res["results"]["a"], "sft": res["results"]["b"]}
    p, s = radar_figure(res).data
    assert (p.name, p.line.color) == ("poisoned model", figures.ATTACK_COLOR)
    assert (s.name, s.line.color, s.fillcolor) == ("Super-fine-tuning (SFT)", figures.color_of("sft"), figures.color_of("sft"))


def test_evaluate_errors_and_stop(digits):
    ctx = digits["ctx"]()
    model = {"m": digits["models"]["clean"]}
    with pytest.raises(ConfigError, match="non-empty dict"):
        evaluate({}, ctx)
    with pytest.raises(ConfigError, match="not evaluated"):
        evaluate(model, ctx, axes=["fgsm"], params={"pgd": {"steps": 3}})
    with pytest.raises(ConfigError, match="unknown sequela axis"):
        evaluate(model, ctx, axes=["fgsm", "nope"])
    no_factory = digits["ctx"](new_model=None)
    with pytest.raises(ConfigError, match="new_model"):
        evaluate(model, no_factory, axes=["stealing"])
    bad = digits["ctx"]()
    bad.members_x = bad.members_x.float()
    with pytest.raises(ConfigError, match="uint8"):
        evaluate(model, bad, axes=["fgsm"])
    stop = threading.Event()
    stop.set()
    res = evaluate(model, ctx, axes=["fgsm", "stealing"], stop=stop)
    assert res["stopped"] and res["results"]["m"] == {}


# -- a context from a stored run ------------------------------------------------------------------

def test_context_for_a_defense_run_uses_its_attack_run(tmp_path):
    from bdft_core.pipeline import AttackConfig, prepare, run_attack, run_defense
    from bdft_core.runs import RunStore
    from bdft_core.sequela import context_for

    store = RunStore(tmp_path / "runs")
    cfg = AttackConfig(dataset="digits", epochs=2.0, seed=3)
    s = prepare(cfg)
    run, model = run_attack(cfg, store=store, setting=s)
    drun, _ = run_defense(run, "ft", params={"epochs": 1.0, "min_steps": 2}, store=store, model=model, setting=s)
    ctx = context_for(drun.id, store, n=200, n_shadow=100, setting=s)
    again = context_for(run, n=200, n_shadow=100, setting=s)
    assert torch.equal(ctx.members_x, again.members_x) and torch.equal(ctx.shadow_y, again.shadow_y)
    assert ctx.sizes() == {"members": 200, "nonmembers": 90, "shadow": 100, "test": 170}
    assert ctx.attack is s.attack and ctx.num_classes == 10 and ctx.seed == 3
    # members: trained on, never the defender's images, never poisoned ones
    poisoned = s.attack.poison(s.data.x_train, s.data.y_train, cfg.poison_rate, s.splits)
    defender = set(s.defender_indices(0.2).tolist())
    excluded = defender | set(poisoned.poison_idx.tolist())
    rows: dict = {}
    for i, r in enumerate(s.data.x_train):
        rows.setdefault(tuple(r.flatten().tolist()), set()).add(i)
    for r, lab in zip(ctx.members_x, ctx.members_y):  # each member is a training image outside both sets
        idx = rows[tuple(r.flatten().tolist())] - excluded
        assert idx and any(int(s.data.y_train[i]) == int(lab) for i in idx)
    # non-members, the attacker's pool and the held-out images are disjoint parts of the test set
    parts = [ctx.nonmembers_x, ctx.shadow_x, ctx.x_test]
    assert sum(len(p) for p in parts) == len(s.data.y_test)
    m = ctx.build_model()
    assert type(m).__name__ == "FastNet" and m.classifier.out_features == 10
    with pytest.raises(ConfigError, match="run store"):
        context_for(drun)
