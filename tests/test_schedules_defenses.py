"""SFT schedule values by hand, defense registry and parameter checks."""
import pytest
import torch

from bdft_core.defenses import DEFENSES, build_defense
from bdft_core.errors import ConfigError
from bdft_core.schedules import Constant, SuperFineTuning, WarmupLinear


def test_sft_schedule_hand_computed():
    s = SuperFineTuning(base=0.0001, max1=0.1, max2=0.001, phase1=0.4, cycles=1)
    v = s.values(10)  # phase 1: steps 0..3 (4 steps), phase 2: steps 4..9 (6 steps)
    assert v[0] == pytest.approx(0.0001)
    assert v[2] == pytest.approx(0.1)  # middle of phase 1: the large peak
    assert v[1] == pytest.approx(0.0001 + (0.1 - 0.0001) * 0.5)
    assert v[4] == pytest.approx(0.0001)  # phase 2 starts at the base again
    assert v[7] == pytest.approx(0.001)  # middle of phase 2: the small peak
    assert max(v[4:]) == pytest.approx(0.001) and max(v[:4]) == pytest.approx(0.1)


def test_sft_defaults_match_published_reimplementations():
    d = build_defense("sft")
    s = d.schedule()
    assert (s.base, s.max1, s.max2, s.phase1) == (3e-4, 0.1, 0.001, 0.4)
    vals = d.schedule_values(n_clean=1000)
    assert len(vals) == d.total_steps(1000) and max(vals) == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("kw,msg", [({"max_lr1": 1e-5}, "base"), ({"phase1": 1.0}, "phase-1"), ({"cycles": 0}, "cycle"),
                                    ({"epochs": 0}, "epochs"), ({"momentun": 0.9}, "no parameter")])
def test_sft_rejects_bad_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build_defense("sft", **kw)


def test_other_schedules():
    assert Constant(0.02).values(3) == [0.02] * 3
    w = WarmupLinear(peak=1.0, warmup=0.5, start=0.0, end=0.0).values(5)
    assert w[0] == 0 and w[2] == pytest.approx(1.0) and w[4] == pytest.approx(0.0)


def test_ft_and_sft_describe_their_schedules_for_plotting():
    """The Defense lab plots every defense whose has_schedule() is true: FT (a constant lr) and SFT
    (base/max rates, no single lr) both, with as many values as the training takes steps."""
    ft, sft = build_defense("ft", lr=0.02), build_defense("sft")
    assert ft.has_schedule() and sft.has_schedule()
    n = 1000  # 16 steps per epoch at batch 64
    assert ft.schedule_values(n) == [0.02] * ft.total_steps(n)
    assert sft.schedule_values(n) == SuperFineTuning(base=3e-4, max1=0.1, max2=0.001, phase1=0.4,
                                                     cycles=1).values(sft.total_steps(n))
    assert not build_defense("abl").has_schedule()  # it trains on the poisoned set, in phases of its own


@pytest.mark.parametrize("kw,msg", [({"epochs": "abc"}, "epochs must be a number, got 'abc'"),
                                    ({"lr": [0.1, 0.2]}, "lr must be a number")])
def test_a_setting_that_is_not_a_number_is_a_config_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build_defense("ft", **kw)


def test_registry_and_unknown_defense():
    assert {"ft", "sft"} <= set(DEFENSES)
    with pytest.raises(ConfigError, match="unknown defense"):
        build_defense("magic")
    for cls in DEFENSES.values():
        assert cls.paper and cls.needs and set(cls.help) == set(cls.defaults)


def test_min_steps_raises_epochs_for_tiny_budgets():
    d = build_defense("ft", epochs=1, batch_size=64, min_steps=60)
    assert d.total_steps(100) == 60  # 2 steps per epoch -> 30 epochs
    assert d.total_steps(64 * 100) == 100


@pytest.mark.parametrize("live", [False, True])
def test_last_layer_ft_changes_only_the_classifier(live):
    """Nothing but the classifier moves, BatchNorm statistics included, also when live evaluations
    (which put the model in eval mode and back) run between the steps."""
    from bdft_core.metrics import Evaluator
    from bdft_core.models import build_model

    torch.manual_seed(0)
    m = build_model("fastnet", 3, 1, widths=(8, 8, 8))
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(40) % 3
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ev = Evaluator(x[:20], y[:20], live_samples=20) if live else None
    build_defense("ft", last_layer_only=True, epochs=1, min_steps=3, lr=0.1, batch_size=20).apply(
        m, x, y, evaluator=ev, eval_every=1)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_a_true_false_setting_takes_only_true_or_false():
    """``--param last_layer_only=False`` arrives as the string "False", which Python reads as true:
    it would have trained the last layer only. It is refused, as is an infinite learning rate."""
    from bdft_core.defenses import build_defense
    from bdft_core.errors import ConfigError

    for bad in ("False", "no", 0):
        with pytest.raises(ConfigError, match="last_layer_only must be true or false"):
            build_defense("ft", last_layer_only=bad)
    assert build_defense("ft", last_layer_only=False).params["last_layer_only"] is False
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        build_defense("ft", lr=float("inf"))
    with pytest.raises(ConfigError, match="momentum must be a finite number"):
        build_defense("ft", momentum=float("nan"))
