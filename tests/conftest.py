import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
def cifar_badnets():
    """The demo's poisoned model (CIFAR-10, BadNets defaults, 2 epochs), trained once per test session
    and shared by the defense tests: ``(run, model)``. Tests must not change ``model`` (defenses work
    on a copy)."""
    real_dataset("cifar10")
    from bdft_core.pipeline import AttackConfig, run_attack

    return run_attack(AttackConfig(dataset="cifar10", epochs=2.0))
