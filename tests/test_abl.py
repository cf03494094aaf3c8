"""ABL: the LGA loss by hand, the phase plan, the per-sample loss, the whole three-phase run on a tiny
poisoned set (progress numbering, artefacts, the model replaced in place), its errors; and a real
poisoned CIFAR-10 model through run_defense."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from bdft_core.defenses.abl import ABL, lga_loss, per_sample_loss
from bdft_core.defenses.base import PoisonedTraining
from bdft_core.errors import ConfigError
from bdft_core.train import TrainConfig


def test_lga_loss_by_hand():
    # two classes, equal logits: CE = ln 2 = 0.693 > 0.5, so the loss is CE (descent)
    z = torch.zeros(3, 2, requires_grad=True)
    y = torch.tensor([0, 1, 0])
    loss = lga_loss(z, y, 0.5)
    assert loss.item() == pytest.approx(math.log(2))
    # confident and right: CE = log(1 + e^-5) = 0.00672 < 0.5, so the loss is -CE (ascent)
    z2 = torch.tensor([[5.0, 0.0]], requires_grad=True)
    loss2 = lga_loss(z2, torch.tensor([0]), 0.5)
    assert loss2.item() == pytest.approx(-math.log1p(math.exp(-5)))
    loss2.backward()
    assert z2.grad[0, 0] > 0  # minimising -CE pushes the right logit down: gradient ascent on CE
    # the batch mean decides the sign (as in the authors' training)
    z3 = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    ce = F.cross_entropy(z3, torch.tensor([0, 0])).item()
    assert lga_loss(z3, torch.tensor([0, 0]), 0.5).item() == pytest.approx(-ce if ce < 0.5 else ce)
    assert lga_loss(z3, torch.tensor([0, 0]), 0.1).item() == pytest.approx(ce)


def test_plan_splits_the_budget():
    plan = ABL().plan(n=1000, epochs=2.0, batch_size=100)
    assert plan == {"isolation": 4, "training": 16, "unlearning": 5, "n_isolated": 10, "main": 20}
    plan = ABL(isolation_share=0.5, isolation_rate=0.1, unlearn_epochs=2, unlearn_batch_size=32).plan(1000, 1.0, 100)
    assert plan == {"isolation": 5, "training": 5, "unlearning": 8, "n_isolated": 100, "main": 10}
    assert ABL(unlearn_epochs=0).plan(1000, 1.0, 100)["unlearning"] == 0


def test_per_sample_loss_matches_cross_entropy():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    lin.train()
    got = per_sample_loss(lin, x, y, batch=2, amp="off")
    with torch.no_grad():
        expect = F.cross_entropy(lin(x.float() / 255), y, reduction="none")
    assert torch.allclose(got, expect, atol=1e-6) and lin.training
    assert torch.allclose(per_sample_loss(lin, x, y), expect, atol=5e-2)  # bf16 autocast where the CPU has it


def _tiny_poisoned(n=300, epochs=2.0):
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    d = load_dataset("digits")
    x, y = d.x_train[:n].clone(), d.y_train[:n].clone()
    poison_idx = torch.arange(0, n, 10)
    x[poison_idx, :, -2:, -2:] = 255
    y[poison_idx] = 0

    def new_model():
        m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
        m.fit_data(x)
        return m

    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.1, amp="off")  # fp32: no bf16 kernel set-up on tiny data
    return PoisonedTraining(x, y, poison_idx, cfg, new_model), d


def test_three_phases_report_and_replace_the_model():
    poisoned, d = _tiny_poisoned()
    model = poisoned.new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []
    cbs = [("on_batch", lambda p: events.append(("batch", p.step, p.total_steps))),
           ("on_epoch_end", lambda p: events.append(("eval", p.step, p.total_steps)))]
    from bdft_core.metrics import Evaluator

    ev = Evaluator(d.x_test[:100], d.y_test[:100], d.x_test[:50], torch.zeros(50, dtype=torch.long), live_samples=50)
    abl = ABL(isolation_rate=0.05, unlearn_epochs=2, unlearn_stop_acc=-1)  # every unlearning step runs
    res = abl.apply(model, d.x_train[:10], d.y_train[:10], evaluator=ev, callbacks=cbs, seed=0, poisoned=poisoned,
                    epochs=1.0)
    plan = abl.plan(300, 1.0, 64)  # the override: 1 epoch, not the run's 2
    assert res.total_steps == res.steps == plan["main"] + plan["unlearning"] and not res.stopped
    assert res.final["unlearn_end"] == "done" and res.final["unlearn_steps"] == plan["unlearning"] == 2
    batches = [s for e, s, _ in events if e == "batch"]
    assert batches == list(range(1, res.total_steps + 1))  # one global numbering across the phases
    assert all(t == res.total_steps for _, _, t in events)
    steps = [h["step"] for h in res.history]
    assert steps == sorted(steps) and steps[0] == plan["isolation"] and steps[-1] == res.total_steps
    flagged = res.artefacts["flagged_idx"]
    assert flagged.dtype == torch.int64 and len(flagged) == res.final["n_isolated"] == 15
    assert res.final["n_flagged"] == 15 and {"precision", "recall", "clean_acc", "asr"} <= set(res.final)
    assert res.final == {**res.final, **poisoned.detection_scores(flagged)}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.seconds > 0


def test_unlearning_halts_once_the_isolated_samples_lose_their_label():
    from bdft_core.defenses.abl import _Clock, _sgd_phase

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([2.0, 0.0]))  # everything is class 0, confidently
    x = torch.full((8, 1, 2, 2), 128, dtype=torch.uint8)
    y = torch.zeros(8, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clock = _Clock(100, 1, [], None, None)
    accs = []

    def halt():
        with torch.no_grad():
            accs.append(float((model(x.float() / 255).argmax(1) == y).float().mean()))
        return accs[-1] <= 0.1

    import threading

    steps, last, why = _sgd_phase(model, x, y, 100, 8, lambda s: 0.5, lambda out, yb: -F.cross_entropy(out, yb), opt,
                                  torch.Generator().manual_seed(0), threading.Event(), clock, 0, False, 0, None,
                                  halt=halt)
    # each ascent step moves the bias towards class 1; halt is asked before every step
    assert why == "halt" and 0 < steps < 100 and accs[-1] == 0.0 and all(a == 1.0 for a in accs[:-1])
    assert len(accs) == steps + 1  # asked before every step taken, and once more when it says stop
    stop = threading.Event()
    stop.set()
    assert _sgd_phase(model, x, y, 5, 8, lambda s: 0.5, lambda out, yb: -F.cross_entropy(out, yb), opt,
                      torch.Generator(), stop, clock, 0, False, 0, None)[::2] == (0, "stop")


def test_stop_before_the_first_step_leaves_the_model_alone():
    import threading

    poisoned, d = _tiny_poisoned(n=100)
    model = poisoned.new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stop = threading.Event()
    stop.set()
    res = ABL().apply(model, d.x_train[:5], d.y_train[:5], stop=stop, poisoned=poisoned)
    assert res.stopped and res.steps == 0 and len(res.artefacts["flagged_idx"]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors():
    with pytest.raises(ConfigError, match="poisoned training set"):
        ABL().apply(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    for bad, match in [({"isolation_share": 1.0}, "isolation_share"), ({"gamma": 0}, "gamma"),
                       ({"isolation_rate": 0}, "isolation_rate"), ({"unlearn_epochs": -1}, "unlearn_epochs"),
                       ({"unlearn_lr": 0}, "unlearn_lr"), ({"unlearn_batch_size": 0}, "unlearn_batch_size"),
                       ({"unlearn_stop_acc": 1.0}, "unlearn_stop_acc")]:
        with pytest.raises(ConfigError, match=match):
            ABL(**bad)
    poisoned, d = _tiny_poisoned(n=50)
    with pytest.raises(ConfigError, match="unknown training setting"):
        ABL().apply(poisoned.new_model(), d.x_train[:5], d.y_train[:5], poisoned=poisoned, epochz=1)


def test_abl_on_a_real_poisoned_model(cifar_badnets, monkeypatch):
    """The demo's BadNets model (CIFAR-10, 10% poisoned, 2 epochs): ABL trains a fresh model with the
    attack run's budget, isolates 1% of the training set, unlearns it. Measured (2-core CPU, shared):
    isolated set 500 images, all poisoned; CA 0.73 -> 0.70, ASR 0.97 -> 0.04 (module docstring)."""
    from bdft_core.defenses import DEFENSES
    from bdft_core.pipeline import run_defense

    monkeypatch.setitem(DEFENSES, ABL.name, ABL)
    run, model = cifar_badnets
    assert run.final["asr"] > 0.9
    t0 = time.perf_counter()
    d_run, _ = run_defense(run, "abl", model=model)
    f = d_run.final
    print(f"abl: CA {run.final['clean_acc']:.3f} -> {f['clean_acc']:.3f}, "
          f"ASR {run.final['asr']:.3f} -> {f['asr']:.3f}, "
          f"isolated {f['n_isolated']} (precision {f['precision']:.3f}, recall {f['recall']:.3f}), unlearning "
          f"{f['unlearn_steps']} steps ({f['unlearn_end']}), total {d_run.timings['total_s']:.1f} s "
          f"({time.perf_counter() - t0:.1f} s)")
    assert d_run.timings["total_s"] > 0 and d_run.defense["uses_poisoned_data"]
    assert f["n_isolated"] == 500 and f["precision"] > 0.9  # the isolated samples are the backdoor's
    assert f["unlearn_end"] == "halt"
    assert f["asr"] < 0.15  # unlearning breaks the backdoor (measured 0.04)
    assert f["clean_acc"] > run.final["clean_acc"] - 0.1
