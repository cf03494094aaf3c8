"""The CUDA path: the same library on a GPU gives the same triggers, learns, stores runs that load on
a CPU, and uses bf16 autocast and channels-last there.

Skipped where there is no CUDA GPU (CI, the 2-core development machines); run on a GPU with
``python -m pytest -q tests/test_cuda.py``. ``BDFT_TEST_DEVICE=cpu`` runs the same checks against
the CPU, to check the tests themselves on a machine without a GPU."""
import os

import pytest
import torch

from bdft_core.attacks import build_attack
from bdft_core.data import Splits, load_dataset
from bdft_core.device import amp_dtype, pick_device
from bdft_core.metrics import Evaluator
from bdft_core.models import build_model
from bdft_core.pipeline import AttackConfig, attack_config_of, run_demo, setting_for
from bdft_core.runs import RunStore
from bdft_core.train import TrainConfig, Trainer

from test_train import _setup as _digits_model  # digits and a seeded FastNet with data-dependent init

DEV = torch.device(os.environ.get("BDFT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine (run on a GPU, see the module docstring)")


def test_auto_picks_the_gpu_and_trains_there_in_bf16_channels_last():
    if DEV.type == "cuda":
        assert pick_device().type == "cuda"
        assert amp_dtype(DEV) == torch.bfloat16  # mixed precision on CUDA, whatever the CPU
    d, m = _digits_model()
    m.to(DEV)
    seen = []
    conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append((out.dtype, out.device.type,
                                                                   inp[0].is_contiguous(memory_format=torch.channels_last))))
    tr = Trainer(m, d.x_train.to(DEV), d.y_train.to(DEV), TrainConfig(epochs=6, batch_size=128, lr=0.2),
                 evaluator=Evaluator(d.x_test.to(DEV), d.y_test.to(DEV)))
    res = tr.run()
    assert res.final["clean_acc"] > 0.85
    assert all(p.device.type == DEV.type for p in m.parameters())
    assert seen and all(dev == DEV.type for _, dev, _ in seen)
    if amp_dtype(DEV) is not None:
        assert all(dt == amp_dtype(DEV) for dt, _, _ in seen)
    assert all(cl for _, _, cl in seen)  # the batches reach the convolutions channels-last


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "sig", "lf"])
def test_triggers_are_the_same_on_the_gpu_and_the_cpu(name):
    a = build_attack(name, (3, 32, 32), 10, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    cpu, dev = a.apply(x), a.apply(x.to(DEV))
    assert dev.device.type == DEV.type
    torch.testing.assert_close(dev.cpu(), cpu, atol=1e-5, rtol=0)
    if name == "wanet":  # its noise mode draws on the device's generator; the warped images are compared above
        return
    xu = (x * 255).round().to(torch.uint8)
    y = torch.arange(6) % 10
    pc = a.poison(xu, y, 0.5, Splits(6, 0))
    pd = a.poison(xu.to(DEV), y.to(DEV), 0.5, Splits(6, 0))
    assert torch.equal(pd.y.cpu(), pc.y)
    assert (pd.x.cpu().int() - pc.x.int()).abs().max() <= 1  # at most a rounding step apart


def test_data_dependent_init_works_on_a_model_already_on_the_gpu():
    d = load_dataset("digits")
    torch.manual_seed(0)
    ref = build_model("fastnet", 10, 1, widths=(8, 8, 16))
    m = build_model("fastnet", 10, 1, widths=(8, 8, 16)).to(DEV)
    m.load_state_dict(ref.state_dict())
    ref.fit_data(d.x_train)
    m.fit_data(d.x_train)  # CPU data, model on the GPU: statistics and whitening land on the GPU
    got, want = m.state_dict(), ref.state_dict()
    assert all(v.device.type == DEV.type for v in got.values())
    w_key = next(k for k, v in m.named_parameters() if v is m.whiten.weight)
    for k in want:
        if k != w_key:
            torch.testing.assert_close(got[k].cpu(), want[k], atol=1e-4, rtol=1e-4)
    # eigenvectors are defined up to sign, so compare the whitening through its Gram matrix
    gram = lambda w: w.reshape(len(w), -1).T.double() @ w.reshape(len(w), -1).double()  # noqa: E731
    torch.testing.assert_close(gram(got[w_key].cpu()), gram(want[w_key]), atol=1e-3, rtol=1e-3)


def test_evaluation_agrees_between_gpu_and_cpu():
    d, m = _digits_model()
    Trainer(m, d.x_train, d.y_train, TrainConfig(epochs=3, batch_size=128, lr=0.2, amp="off")).run()
    m.eval()
    a = build_attack("badnets", (1, 8, 8), 10, size=2)
    x_bd, y_bd = a.test_set(d.x_test, d.y_test)
    cpu = Evaluator(d.x_test, d.y_test, x_bd, y_bd)(m, live=False, amp_dtype=None)
    m_dev = build_model("fastnet", 10, 1, widths=(16, 16, 32))
    m_dev.load_state_dict(m.state_dict())
    m_dev.to(DEV).eval()
    dev = Evaluator(d.x_test.to(DEV), d.y_test.to(DEV), x_bd.to(DEV), y_bd.to(DEV))(m_dev, live=False, amp_dtype=None)
    n = len(d.y_test)
    assert abs(dev["clean_acc"] - cpu["clean_acc"]) <= 2 / n  # TF32 may flip a near-tie, no more
    assert abs(dev["asr"] - cpu["asr"]) <= 2 / len(y_bd)


def test_demo_on_the_gpu_stores_runs_that_load_and_measure_on_a_cpu(tmp_path):
    store = RunStore(tmp_path / "runs")
    out = run_demo(AttackConfig(dataset="digits", device=str(DEV)), store=store)
    assert out["device"].startswith(DEV.type)
    assert out["poisoned"]["asr"] > 0.9
    assert out["defended"]["sft"]["asr"] < out["poisoned"]["asr"] - 0.3
    cfg = attack_config_of(store.load_model(out["run_id"])[0])
    cfg.device = "cpu"
    evaluator = setting_for(store.load_model(out["run_id"])[0], cfg).evaluator  # the same test sets, on the CPU
    for rid in (out["run_id"], out["defended"]["sft"]["run_id"]):
        run, model = store.load_model(rid, device="cpu")
        assert run.device.startswith(DEV.type)
        assert all(p.device.type == "cpu" for p in model.parameters())
        cpu = evaluator(model, live=False, amp_dtype=None)
        # fp32 on the CPU against bf16 on the GPU: the same model, a few borderline images apart
        assert abs(cpu["clean_acc"] - run.final["clean_acc"]) < 0.03
        assert abs(cpu["asr"] - run.final["asr"]) < 0.03
