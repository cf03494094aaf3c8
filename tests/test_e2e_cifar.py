"""End to end on real CIFAR-10 (through the dataset registry: BDFT_DATA_DIR, or a download when
online): the README's demo figures, and the demo's criteria for the other default attacks
(Blended, WaNet: their ASR, and SFT removing them)."""
import pytest

from bdft_core.pipeline import AttackConfig, run_demo

from conftest import real_dataset


@pytest.fixture(scope="module", autouse=True)
def _cifar():
    real_dataset("cifar10")


def test_demo_badnets_poisons_then_sft_removes_the_backdoor(cifar_demo):
    out, store = cifar_demo  # run_demo(AttackConfig(dataset="cifar10")): what `demo --dataset cifar10` runs
    p, sft, ft = out["poisoned"], out["defended"]["sft"], out["defended"]["ft"]
    print(out)
    assert p["clean_acc"] >= 0.70 and p["asr"] >= 0.95
    assert sft["asr"] <= 0.05
    assert sft["clean_acc"] >= p["clean_acc"] - 0.03
    assert ft["asr"] < p["asr"]  # plain FT also lowers it, though less
    runs = store.list()
    assert len(runs) == 3 and {r["id"] for r in runs} == {out["run_id"], sft["run_id"], ft["run_id"]}


@pytest.mark.parametrize("attack", ["blended", "wanet"])
def test_default_attacks_reach_high_asr_and_sft_removes_them(attack):
    """The demo's criteria for the other default attacks: ASR >= 90% after the attack, CA >= 70%,
    and after SFT ASR <= 5% at most 3 points of CA lost. (Fixing the whitening bias during
    fine-tuning, a 1.3x faster step, left Blended at 57% ASR after SFT: this test catches that.)"""
    out = run_demo(AttackConfig(dataset="cifar10", attack=attack), defenses=("sft",))
    p, sft = out["poisoned"], out["defended"]["sft"]
    print(attack, out)
    assert p["asr"] >= 0.90 and p["clean_acc"] >= 0.70
    assert sft["asr"] <= 0.05 and sft["clean_acc"] >= p["clean_acc"] - 0.03
