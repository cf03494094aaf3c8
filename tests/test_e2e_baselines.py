"""Baseline defenses on a real poisoned model (CIFAR-10, the demo's BadNets defaults): each runs,
reports CA, ASR and its wall time, and weakens the backdoor while keeping most clean accuracy (measured
drops: Fine-Pruning and FT-SAM about 5 points, FST about 5-6)."""
import pytest

from bdft_core.pipeline import run_defense


@pytest.fixture(scope="module")
def poisoned(cifar_badnets):
    return cifar_badnets


@pytest.mark.parametrize("name", ["fine_pruning", "ft_sam", "fst"])
def test_baseline_defense_on_a_real_poisoned_model(poisoned, name):
    run, model = poisoned
    assert run.final["asr"] > 0.9
    d_run, _ = run_defense(run, name, model=model)
    assert d_run.timings["total_s"] > 0 and d_run.defense["name"] == name
    assert d_run.final["asr"] < run.final["asr"] - 0.3  # the backdoor weakens
    assert d_run.final["clean_acc"] > run.final["clean_acc"] - 0.08  # clean accuracy is mostly kept
    if name == "fine_pruning":
        assert d_run.final["pruned_channels"] == round(0.3 * 96)
