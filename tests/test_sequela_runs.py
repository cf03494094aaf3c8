"""Sequela of stored runs: the poisoned model and its defended children measured together, kept with
the run (reopening is instant), flagged stale when a defense is added; the CLI's JSON; the job."""
import json
import os
import subprocess
import sys

import pytest

from bdft_core.errors import ConfigError
from bdft_core.jobs import JobManager
from bdft_core.pipeline import AttackConfig, run_attack, run_defense
from bdft_core.runs import RunStore
from bdft_core.sequela_runs import check_axes, sequela_run, stored_sequela, table_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ["membership", "calibration", "fgsm"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    run, _ = run_attack(AttackConfig(dataset="digits", epochs=3, model_kwargs={"widths": [8, 8, 16]}), store=store)
    run_defense(run.id, "ft", {"epochs": 1, "min_steps": 5}, store=store)
    return root, store, run


def test_sequela_of_a_run_and_its_children_is_kept(stored):
    _, store, run = stored
    assert stored_sequela(store, run.id) is None
    res = sequela_run(store, run.id, axes=AXES, n=100)
    assert res["models"] == ["poisoned", "ft"] and res["axes"] == AXES
    kept = stored_sequela(store, run.id)
    assert kept["results"]["ft"]["membership"]["value"] == pytest.approx(res["results"]["ft"]["membership"]["value"])
    assert kept["stale"] is False
    rows = table_rows(kept)
    assert [r["axis"] for r in rows] == [res["meta"][a]["title"] for a in AXES]
    ft = res["results"]["ft"]["calibration"]["value"] - res["results"]["poisoned"]["calibration"]["value"]
    assert rows[1]["Fine-tuning (FT)"].endswith(f"({ft:+.3f})")
    run_defense(run.id, "sft", {"epochs": 1, "min_steps": 5}, store=store)
    assert stored_sequela(store, run.id)["stale"] is True  # a defense added since: measure again


def test_members_leave_out_every_defenses_clean_data_and_a_rerun_defense_makes_the_result_stale(tmp_path, monkeypatch):
    """A defense fine-tuned on 60% of the training set is not scored on members drawn from that 60%;
    re-running a defense under the same name (new settings, new run) makes the stored result stale."""
    import bdft_core.sequela as sequela

    store = RunStore(tmp_path)
    run, _ = run_attack(AttackConfig(dataset="digits", epochs=1, model_kwargs={"widths": [8, 8, 16]}), store=store)
    run_defense(run.id, "ft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.6, store=store)
    run_defense(run.id, "sft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.1, store=store)
    asked = []
    real = sequela.context_for
    monkeypatch.setattr(sequela, "context_for", lambda *a, **kw: asked.append(kw.get("clean_fraction")) or real(*a, **kw))
    sequela_run(store, run.id, axes=["calibration"], n=50)
    assert asked == [0.6]
    assert stored_sequela(store, run.id)["stale"] is False
    run_defense(run.id, "ft", {"epochs": 1, "min_steps": 3}, clean_fraction=0.6, store=store)  # ft again
    assert stored_sequela(store, run.id)["stale"] is True


def test_a_stopped_defense_is_not_measured_as_the_defense_and_a_deleted_one_is_named(tmp_path):
    """Explain and Sequela measure the newest *finished* run per defense: a newer run stopped half-way
    is not "after FT". A measured defense deleted since is named, not called "applied after"."""
    import threading

    from bdft_core.explain_runs import models_of

    store = RunStore(tmp_path)
    run, _ = run_attack(AttackConfig(dataset="digits", epochs=1, model_kwargs={"widths": [8, 8, 16]}), store=store)
    ft, _ = run_defense(run.id, "ft", {"epochs": 1, "min_steps": 2}, store=store)
    sft, _ = run_defense(run.id, "sft", {"epochs": 1, "min_steps": 2}, store=store)
    halt = threading.Event()
    half, _ = run_defense(run.id, "ft", {"epochs": 1, "min_steps": 50}, store=store, stop=halt,
                          callbacks=[("on_batch", lambda p: halt.set())])
    assert half.status == "stopped"
    assert store.newest_defenses(run.id, stopped=False) == {"ft": ft.id, "sft": sft.id}
    assert store.newest_defenses(run.id)["ft"] == ft.id  # a finished run wins over a newer stopped one
    _, models = models_of(store, run.id)
    assert set(models) == {"poisoned", "ft", "sft"}
    res = sequela_run(store, run.id, axes=["calibration"], n=50)
    assert res["children"] == {"ft": ft.id, "sft": sft.id}
    kept = stored_sequela(store, run.id)
    assert kept["stale"] is False and kept["deleted"] == []
    store.delete(sft.id)
    kept = stored_sequela(store, run.id)
    assert kept["stale"] is True and kept["deleted"] == ["sft"]
    store.delete(ft.id)  # only the stopped FT is left: it shows where nothing finished, but is not measured
    assert store.newest_defenses(run.id) == {"ft": half.id} and store.newest_defenses(run.id, stopped=False) == {}


def test_cli_sequela_json(stored):
    root, _, run = stored
    r = subprocess.run([sys.executable, "-m", "bdft_core", "--runs-dir", str(root), "sequela", "--run", run.id, "--axes",
                        "membership,calibration", "--n", "100", "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["results"]) == set(out["models"]) and {"poisoned", "ft"} <= set(out["models"])
    for model in out["models"]:
        assert 0 <= out["results"][model]["membership"]["value"] <= 1
    bad = subprocess.run([sys.executable, "-m", "bdft_core", "--runs-dir", str(root), "sequela", "--run", run.id,
                          "--axes", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown sequela axis" in bad.stderr and "Traceback" not in bad.stderr


def test_sequela_job_reports_progress_and_stores(stored):
    _, store, run = stored
    jm = JobManager(store)
    with pytest.raises(ConfigError):
        jm.submit("sequela", run_id=run.id, axes=["nope"])
    jid = jm.submit("sequela", run_id=run.id, axes=["calibration"])
    job = jm.wait(jid, timeout=300)
    assert job.status == "finished", job.error
    assert stored_sequela(store, run.id)["axes"] == ["calibration"]
    assert check_axes(None) is None
