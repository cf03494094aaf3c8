"""NAD (neural attention distillation): the attention map and loss by hand, the distilled layers of
fastnet and ResNet-18, the distillation term pulling the student onto the teacher, stop, bad settings,
and on a real poisoned CIFAR-10 model the defense lowers ASR while keeping clean accuracy."""
import math
import threading

import pytest
import torch

from bdft_core.defenses.nad import NAD, attention_layers, attention_loss, attention_map
from bdft_core.errors import ConfigError


def test_attention_map_by_hand():
    # one image, 2 channels, 1x2 pixels: channel 0 = [1, 2], channel 1 = [-3, 0]
    act = torch.tensor([[[[1.0, 2.0]], [[-3.0, 0.0]]]])
    # mean over channels of |a|^2: [(1 + 9) / 2, (4 + 0) / 2] = [5, 2], then L2-normalised
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    assert torch.allclose(attention_map(act, 2.0), expected)
    # p = 1: [(1 + 3) / 2, (2 + 0) / 2] = [2, 1] -> [2, 1] / sqrt(5)
    assert torch.allclose(attention_map(act, 1.0), torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))


def test_attention_loss_by_hand():
    a = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 3.0]]]])  # two images, one channel: maps [1, 0] and [0, 1]
    b = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 1.0]]]])  # maps [0, 1] and [0, 1]
    # distances: ||[1, -1]|| = sqrt(2) and 0; mean over the batch
    assert attention_loss(a, b).item() == pytest.approx(math.sqrt(2.0) / 2)
    assert attention_loss(b, b).item() == 0.0
    # scale-invariant: the maps are normalised
    assert attention_loss(a, 7.0 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_distilled_layers_of_fastnet_and_resnet():
    from bdft_core.models import build_model

    x = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    f = build_model("fastnet", 10, 3, widths=[8, 8, 8])
    assert attention_layers(f, 3, x) == [f.body[2], f.body[3], f.body[4]]  # the three conv blocks
    assert attention_layers(f, 1, x) == [f.body[4]]
    r = build_model("resnet18", 10, 3, width=8)
    # body = [stem conv, 8 blocks (2 per stage), ...]: the ends of layer2, layer3, layer4
    assert attention_layers(r, 3, x) == [r.body[4], r.body[6], r.body[8]]


def _digits_model():
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    d = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
    m.fit_data(d.x_train)
    return d, m


def _attention_gap(student, teacher, x):
    ls, lt = attention_layers(student, 3, x), attention_layers(teacher, 3, x)
    acts = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=("s", k): acts.__setitem__(k, o)) for k, m in enumerate(ls)]
    hooks += [m.register_forward_hook(lambda mod, i, o, k=("t", k): acts.__setitem__(k, o)) for k, m in enumerate(lt)]
    student.eval()
    teacher.eval()
    with torch.no_grad():
        student(x.float() / 255)
        teacher(x.float() / 255)
    for h in hooks:
        h.remove()
    return sum(attention_loss(acts[("s", k)], acts[("t", k)]).item() for k in range(3))


def test_distillation_pulls_the_student_onto_the_teacher():
    import copy

    d, m = _digits_model()
    x, y = d.x_train[:128], d.y_train[:128]
    kw = dict(teacher_epochs=2.0, teacher_lr=0.1, epochs=4.0, min_steps=4, batch_size=32, lr=0.02)
    gaps = {}
    for beta in (0.0, 20.0):
        model = copy.deepcopy(m)
        nad = NAD(beta=beta, **kw)
        res = nad.apply(model, x, y, seed=0, amp="off")
        assert res.steps == res.total_steps == 24 and res.final["teacher_steps"] == 8  # 4 steps per epoch
        gaps[beta] = _attention_gap(model, nad.teacher, x)
    # the same teacher (same seed) both times; only the distillation term differs
    assert gaps[20.0] < 0.7 * gaps[0.0]


def test_progress_spans_both_phases_and_stop_keeps_the_model():
    d, m = _digits_model()
    x, y = d.x_train[:128], d.y_train[:128]
    seen = []
    nad = NAD(teacher_epochs=1.0, epochs=1.0, min_steps=4, batch_size=32, teacher_lr=0.05, lr=0.01)
    assert nad.total_steps(128) == 8 and nad.schedule_values(128) == [0.05] * 4 + [0.01] * 4
    NAD(teacher_epochs=1.0, epochs=1.0, min_steps=4, batch_size=32).apply(
        m, x, y, callbacks=[("on_batch", lambda p: seen.append((p.step, p.total_steps)))], amp="off")
    assert seen == [(k, 8) for k in range(1, 9)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    stop = threading.Event()
    stop.set()
    res = NAD(teacher_epochs=1.0, epochs=1.0, min_steps=4, batch_size=32).apply(m, x, y, stop=stop, amp="off")
    assert res.stopped and res.steps == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("bad, match", [({"beta": -1}, "beta"), ({"p": 0}, "p \\(the attention"),
                                        ({"layers": 0}, "layers"), ({"layers": 1.5}, "layers"),
                                        ({"teacher_epochs": 0}, "teacher_epochs"), ({"teacher_lr": 0}, "teacher_lr"),
                                        ({"lr": -0.1}, "learning rate"), ({"alpha": 1}, "no parameter")])
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        NAD(**bad)


def test_nad_on_a_real_poisoned_model(cifar_badnets):
    from bdft_core.defenses import DEFENSES
    from bdft_core.pipeline import run_defense

    DEFENSES.setdefault(NAD.name, NAD)
    run, model = cifar_badnets
    d_run, _ = run_defense(run, "nad", model=model)
    print("nad", run.final, "->", d_run.final, d_run.timings)
    assert d_run.timings["total_s"] > 0 and d_run.defense["name"] == "nad"
    assert d_run.final["asr"] < run.final["asr"] - 0.3  # the backdoor weakens
    assert d_run.final["clean_acc"] > run.final["clean_acc"] - 0.1  # clean accuracy is mostly kept
    assert d_run.history[0]["step"] == 0 and d_run.history[-1]["step"] == d_run.final["total_steps"]
