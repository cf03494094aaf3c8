"""Attribution maps of stored runs: the poisoned model and its defended children on the same non-target
test images; PNGs written by the CLI; clear errors for a bad run or a missing child."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bdft_core.errors import ConfigError
from bdft_core.explain_runs import explain_run, panel, pick_images
from bdft_core.pipeline import AttackConfig, run_attack, run_defense
from bdft_core.runs import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    run, model = run_attack(AttackConfig(dataset="digits", epochs=3, model_kwargs={"widths": [8, 8, 16]}), store=store)
    child, _ = run_defense(run.id, "ft", {"epochs": 1, "min_steps": 5}, store=store)
    return root, store, run, child


def test_pick_images_avoids_the_target():
    from bdft_core.attacks import build_attack

    atk = build_attack("badnets", (1, 8, 8), 3, target=1)
    y = torch.tensor([1, 0, 1, 2, 1, 0])
    idx = pick_images(y, atk, 10)
    assert sorted(idx.tolist()) == [1, 3, 5]
    with pytest.raises(ConfigError):
        pick_images(torch.tensor([1, 1]), atk, 2)


def test_explain_run_and_panel(stored):
    _, store, run, child = stored
    res = explain_run(store, run.id, n=4, method="saliency")
    assert list(res["models"]) == ["poisoned", "ft"] and (res["labels"] != run.attack["target"]).all()
    img = panel(res, "poisoned", scale=2)
    assert img.shape == (2 * 8 * 2, 4 * 8 * 2, 3) and img.dtype == np.uint8
    with pytest.raises(ConfigError, match="no finished defended child"):
        explain_run(store, run.id, defended=["nad"], n=2)
    with pytest.raises(ConfigError, match="explain a poisoned run"):
        explain_run(store, child.id, n=2)


def test_cli_explain_writes_pngs(stored, tmp_path):
    root, _, run, _ = stored
    r = subprocess.run([sys.executable, "-m", "bdft_core", "--runs-dir", str(root), "explain", "--run", run.id, "--n", "3",
                        "--out", str(tmp_path / "png"), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["model"] for row in out["rows"]] == ["poisoned", "ft"] and len(out["images"]) == 2
    with Image.open(out["images"][0]) as im:
        assert im.size == (3 * 8 * 4, 2 * 8 * 4)
