"""Comparing defenses on one poisoned run: the CLI's `compare` (JSON contract), rows with changes from
the poisoned model, skipped and failed defenses reported without losing the others, the verdict."""
import json
import os
import subprocess
import sys

import pytest

from bdft_core.compare import best_baseline, compare_defenses, compare_names, verdict
from bdft_core.defenses import DEFENSES, Defense
from bdft_core.errors import ConfigError
from bdft_core.pipeline import AttackConfig, run_attack
from bdft_core.runs import RunStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = dict(dataset="digits", epochs=3, model_kwargs={"widths": [8, 8, 16]}, device="cpu")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    run, _ = run_attack(AttackConfig(**QUICK), store=store)
    return root, store, run


def test_cli_compare_json(poisoned):
    root, store, run = poisoned
    r = subprocess.run([sys.executable, "-m", "bdft_core", "--runs-dir", str(root), "compare", "--run", run.id,
                        "--defenses", "ft,fst", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "BDFT_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["defense"] for row in out["rows"]] == ["ft", "fst"]
    assert out["poisoned"]["asr"] == pytest.approx(run.final["asr"])
    for row in out["rows"]:
        child = store.get(row["run_id"])  # each result is stored as a child of the poisoned run
        assert child.parent == run.id
        assert row["clean_acc"] == pytest.approx(child.final["clean_acc"])
        assert row["d_asr"] == pytest.approx(child.final["asr"] - run.final["asr"])
        assert row["seconds"] > 0 and "clean labelled data" in row["needs"]
    assert "SFT" in out["verdict"]  # no SFT row: the verdict says what to run


def test_one_failing_defense_does_not_lose_the_others(poisoned, monkeypatch):
    _, store, run = poisoned

    class Broken(Defense):
        name = "broken"
        title = "Broken"
        defaults = {}

        def apply(self, *a, **k):
            raise ConfigError("this defense always fails")

    class NeedsTraining(Defense):
        name = "needs_training"
        title = "Needs training data"
        uses_poisoned_data = True
        defaults = {}

        def apply(self, model, x, y, evaluator=None, poisoned=None, **k):
            from bdft_core.train import TrainResult

            assert poisoned is not None and len(poisoned.poison_idx) == run.attack["n_poisoned"]
            return TrainResult(final={**evaluator(model), **poisoned.detection_scores(poisoned.poison_idx[:3])})

    monkeypatch.setitem(DEFENSES, "broken", Broken)
    monkeypatch.setitem(DEFENSES, "needs_training", NeedsTraining)
    out = compare_defenses(run.id, ["broken", "needs_training"], store=store, params={})
    assert out["failed"] == [{"defense": "broken", "error": "this defense always fails"}]
    (row,) = out["rows"]
    assert row["defense"] == "needs_training" and row["precision"] == 1.0
    assert row["recall"] == pytest.approx(3 / run.attack["n_poisoned"])


def test_bad_names():
    with pytest.raises(ConfigError, match="unknown defense"):
        compare_names(["ft", "nope"])
    assert compare_names(None)[:2] == ["ft", "sft"]


def test_verdict_and_best_baseline():
    rows = [{"defense": "sft", "title": "SFT", "asr": 0.03, "clean_acc": 0.70, "seconds": 20.0},
            {"defense": "ft", "title": "FT", "asr": 0.5, "clean_acc": 0.72, "seconds": 18.0},
            {"defense": "anp", "title": "ANP", "asr": 0.04, "clean_acc": 0.60, "seconds": 50.0},
            {"defense": "nad", "title": "NAD", "asr": 0.04, "clean_acc": 0.66, "seconds": 40.0}]
    assert best_baseline(rows)["defense"] == "nad"  # ASR tie: the higher clean accuracy wins
    assert verdict({"rows": rows}).endswith("SFT matches it at lower cost, as the paper claims.")
    rows[0]["asr"] = 0.3
    assert "leaves a higher ASR" in verdict({"rows": rows})
    # a stopped run is not a result: not SFT's, not the best baseline's
    rows[0]["asr"] = 0.03
    rows[3]["status"] = "stopped"
    assert best_baseline(rows)["defense"] == "anp"
    rows[0]["status"] = "stopped"
    assert "stopped" in verdict({"rows": rows}) and "as the paper claims" not in verdict({"rows": rows})
    rows[0]["status"] = rows[3]["status"] = "finished"
    # a baseline that wrecked the model is passed over while another kept clean accuracy
    wreck = {"defense": "ibau", "title": "I-BAU", "asr": 0.0, "clean_acc": 0.20, "seconds": 30.0}
    assert best_baseline(rows + [wreck], poisoned_ca=0.72)["defense"] == "nad"
    assert best_baseline(rows + [wreck])["defense"] == "ibau"
    # matching ASR while losing clean accuracy is not the paper's claim; a missing time does not crash
    rows[0]["clean_acc"] = 0.35
    v = verdict({"rows": rows, "poisoned": {"clean_acc": 0.72}})
    assert "as the paper claims" not in v and "31.0 points less clean accuracy" in v
    rows[0]["clean_acc"], rows[0]["seconds"] = 0.70, None
    assert "time not recorded" in verdict({"rows": rows})


def test_stopped_defense_is_marked_in_the_table_and_unknown_time_is_not_zero():
    from bdft_core import figures

    before = {"clean_acc": 0.73, "asr": 0.97, "seconds": 90.0}
    rows = [{"defense": "sft", "title": "SFT", "clean_acc": 0.70, "asr": 0.05, "seconds": None, "status": "stopped"},
            {"defense": "nad", "title": "NAD", "clean_acc": 0.70, "asr": float("nan"), "seconds": 10.0}]
    table = figures.comparison_rows(before, rows)
    assert table[1]["defense"] == "SFT (stopped)" and table[1]["seconds"] == "–" and table[2]["ΔASR"] == "–"
    fig = figures.cost_scatter(before, rows)
    assert "time not recorded" in fig.data[0].hovertemplate and fig.data[0].marker.size > 12


def test_comparison_table_and_scatter():
    import torch

    from bdft_core import figures

    before = {"clean_acc": 0.73, "asr": 0.97, "seconds": 90.0}
    rows = [{"defense": "sft", "title": "SFT", "clean_acc": 0.70, "asr": 0.05, "seconds": 20.0, "needs": "clean data"},
            {"defense": "spectral_signatures", "title": "Spectral Signatures", "clean_acc": 0.72, "asr": 0.10,
             "seconds": 80.0, "needs": "the poisoned training set", "precision": 0.5, "recall": 1.0}]
    table = figures.comparison_rows(before, rows)
    assert [r["ΔASR"] for r in table] == ["", "-92.0 pts", "-87.0 pts"]
    assert table[2]["detection"] == "precision 50%, recall 100%" and table[2]["needs"] == "the poisoned training set"
    fig = figures.cost_scatter(before, rows)
    sft, ss, poisoned = fig.data
    assert (sft.x[0], sft.y[0]) == pytest.approx((70.0, 5.0)) and poisoned.name == "poisoned model"
    assert ss.marker.size == pytest.approx(60.0) and sft.marker.size == pytest.approx(12 + 48 * 0.5)  # area ~ seconds
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0
    img = figures.reversed_trigger_display(mask, torch.ones(3, 2, 2), scale=1)
    assert img.shape == (2, 2, 3) and img[0, 0].tolist() == [255, 255, 255] and img[1, 1].tolist() == [128, 128, 128]


def test_a_row_keeps_what_each_defense_reports_of_its_own():
    """A defense added later reports its own figures (here a made-up ``purity``): the comparison row
    keeps them beside the common columns, with no list of names to extend."""
    from bdft_core.compare import row_of
    from bdft_core.runs import Run

    common = dict(created=0.0, dataset="digits", model={}, attack={}, config={}, seed=0, device="cpu")
    parent = Run(id="p", kind="attack", final={"clean_acc": 0.9, "asr": 1.0}, **common)
    d = Run(id="d", kind="defense", parent="p", defense={"name": "ft", "title": "FT"},
            final={"clean_acc": 0.88, "asr": 0.25, "purity": 0.75, "flagged_classes": [3]},
            timings={"total_s": 2.0}, **common)
    row = row_of(parent, d)
    assert row["purity"] == 0.75 and row["flagged_classes"] == [3]
    assert row["d_asr"] == pytest.approx(-0.75) and row["clean_acc"] == 0.88 and row["run_id"] == "d"
