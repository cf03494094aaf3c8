import os

import pytest
import torch

from bdft_core.device import tune_allocator

torch.set_num_threads(min(2, os.cpu_count() or 1))
tune_allocator()  # what the CLI and the app do at start-up (freed tensor memory reused, not faulted in again)


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Every test stores runs in its own temporary folder."""
    monkeypatch.setenv("BDFT_RUNS_DIR", str(tmp_path / "runs"))


def real_dataset(name: str):
    """A real dataset through the project's registry (BDFT_DATA_DIR; downloads when online).
    Skips, saying why, only where the data cannot be had at all."""
    from bdft_core.data import load_dataset
    from bdft_core.errors import DatasetNotFound

    try:
        return load_dataset(name)
    except DatasetNotFound as exc:  # pragma: no cover - CI sets BDFT_DATA_DIR
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cifar_demo(tmp_path_factory):
    """The README's demo on CIFAR-10 (BadNets defaults, 2 epochs, then FT and SFT on 20% clean data),
    run once per test session and stored: ``(out, store)``. The demo's own test checks its figures;
    the defense tests start from its poisoned model, so that model is trained only once."""
    real_dataset("cifar10")
    from bdft_core.pipeline import AttackConfig, run_demo
    from bdft_core.runs import RunStore

    store = RunStore(tmp_path_factory.mktemp("demo_runs"))
    return run_demo(AttackConfig(dataset="cifar10"), store=store), store


@pytest.fixture(scope="session")
def cifar_badnets(cifar_demo):
    """The demo's poisoned model (CIFAR-10, BadNets defaults, 2 epochs), loaded from the demo's store
    and shared by the defense tests: ``(run, model)``. Tests must not change ``model`` (defenses work
    on a copy)."""
    out, store = cifar_demo
    run, model = store.load_model(out["run_id"])
    assert run.kind == "attack" and run.config["epochs"] == 2.0
    return run, model
