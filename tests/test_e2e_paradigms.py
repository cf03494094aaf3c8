"""End to end on real data, one per paradigm beyond standalone (issue 4's "what must hold").

Data comes through the project's registry (``BDFT_DATA_DIR``; ``.ci/run`` points it at
``../shared/data``). The encoder paradigm uses the shipped clean encoder in ``assets/``."""
import pytest

from bdft_core.pipeline import AttackConfig, run_demo
from bdft_core.runs import RunStore

from conftest import real_dataset


@pytest.fixture(scope="module")
def encoder_demo(tmp_path_factory):
    real_dataset("cifar10")
    real_dataset("gtsrb")
    store = RunStore(tmp_path_factory.mktemp("runs"))
    return run_demo(AttackConfig(dataset="cifar10", paradigm="encoder"), clean_fraction=0.05, store=store), store


def test_badencoder_on_the_shipped_encoder(encoder_demo):
    out, _ = encoder_demo
    assert out["downstream"] == "gtsrb"
    assert out["poisoned"]["asr"] >= 0.80  # the backdoor reaches the victim's downstream classifier
    assert abs(out["poisoned"]["clean_acc"] - out["clean_encoder"]["clean_acc"]) <= 0.05  # and hides
    assert out["clean_encoder"]["asr"] <= 0.10  # the clean encoder does not obey the trigger


def test_sft_on_five_percent_removes_it(encoder_demo):
    out, store = encoder_demo
    sft, ft = out["defended"]["sft"], out["defended"]["ft"]
    assert sft["asr"] <= 0.20
    assert 0 <= ft["asr"] <= 1 and 0 <= ft["clean_acc"] <= 1  # FT is reported in the same setting
    child = store.get(sft["run_id"])
    assert child.config["clean_fraction"] == 0.05 and child.config["n_clean"] < 1000  # 5% of GTSRB's victim data


@pytest.fixture(scope="module")
def transfer_demo(tmp_path_factory):
    real_dataset("cifar10")
    store = RunStore(tmp_path_factory.mktemp("runs"))
    return run_demo(AttackConfig(dataset="cifar10", paradigm="transfer"), store=store), store


def test_transfer_badnets_same_label_space(transfer_demo):
    out, store = transfer_demo
    assert out["attacker"]["asr"] >= 0.90 and out["attacker"]["clean_acc"] >= 0.55
    v = out["victim_head"]
    assert v["asr"] >= 0.5  # a new head on the published features keeps the backdoor
    assert out["defended"]["sft"]["asr"] <= 0.20 and out["defended"]["sft"]["asr"] < v["asr"]
    victim = store.get(out["run_id"])
    assert victim.kind == "victim" and victim.config["n_victim"] == 25000  # half of CIFAR-10's training set
