"""The background job manager the dashboard polls: queueing, progress, stop, errors."""
import threading
import time

import pytest

from bdft_core.errors import ConfigError, RunNotFound
from bdft_core.jobs import JobManager
from bdft_core.runs import RunStore

DIGITS = {"dataset": "digits", "epochs": 2.0}


@pytest.fixture
def jm(tmp_path):
    return JobManager(RunStore(tmp_path / "runs"))


def test_attack_job_reports_progress_and_stores_run(jm):
    jid = jm.submit("attack", config=DIGITS)
    j = jm.wait(jid, timeout=120)
    assert j.status == "finished", j.error
    assert j.stages == ["attack"]
    pts = j.series["attack"]
    assert len(pts) >= 2 and all(0 <= p["asr"] <= 1 for p in pts)
    assert [p["step"] for p in pts] == sorted(p["step"] for p in pts)
    assert j.progress["step"] == j.progress["total_steps"] > 0
    assert j.overall_fraction == 1.0
    run = jm.store.get(j.result["run_id"])
    assert run.final["asr"] == j.result["asr"]


def test_demo_job_runs_each_stage_and_keeps_series_apart(jm):
    jid = jm.submit("demo", config=DIGITS, defenses=["ft", "sft"], clean_fraction=0.2)
    j = jm.wait(jid, timeout=180)
    assert j.status == "finished", j.error
    assert set(j.series) == {"attack", "ft", "sft"}
    assert set(j.result["defended"]) == {"ft", "sft"}
    assert len(j.run_ids) == 3 and all(jm.store.get(r) for r in j.run_ids)
    # a defense's first point is the poisoned model before any defense step
    assert j.series["sft"][0]["step"] == 0


def test_jobs_run_one_at_a_time_in_order(jm):
    a = jm.submit("attack", config={**DIGITS, "epochs": 6.0})
    b = jm.submit("attack", config={**DIGITS, "epochs": 1.0})
    assert jm.get(b).status == "queued" and jm.queue_position(b) >= 1
    jb = jm.wait(b, timeout=180)
    ja = jm.get(a)
    assert ja.status == jb.status == "finished"
    assert ja.ended <= jb.started  # b waited for a


def test_stop_running_and_cancel_queued(jm):
    a = jm.submit("attack", config={**DIGITS, "epochs": 500.0})
    b = jm.submit("attack", config=DIGITS)
    t0 = time.monotonic()
    while jm.get(a).progress.get("step", 0) < 2:
        time.sleep(0.05)
        assert time.monotonic() - t0 < 60
    jm.stop(b)
    assert jm.get(b).status == "stopped"  # cancelled before it started
    jm.stop(a)
    t_stop = time.monotonic()
    ja = jm.wait(a, timeout=60)
    assert ja.status == "stopped" and time.monotonic() - t_stop < 10
    run = jm.store.get(ja.result["run_id"])
    assert run.status == "stopped" and run.final["steps"] < run.final["total_steps"]
    assert jm.get(b).started is None  # never ran


def test_bad_settings_fail_at_submit_with_a_clear_message(jm):
    with pytest.raises(ConfigError, match="unknown setting"):
        jm.submit("attack", config={"dataset": "digits", "colour": "red"})
    with pytest.raises(ConfigError, match="unknown defense"):
        jm.submit("demo", config=DIGITS, defenses=["magic"])
    with pytest.raises(ConfigError, match="clean fraction"):
        jm.submit("demo", config=DIGITS, defenses=["sft"], clean_fraction=0)
    with pytest.raises(RunNotFound):
        jm.submit("defend", parent="nope", defenses=["ft"])
    with pytest.raises(ConfigError, match="job kind"):
        jm.submit("dance")


def test_failure_in_the_worker_is_a_message_and_the_worker_survives(jm):
    bad = jm.submit("attack", config={"dataset": "digits", "attack": "badnets", "params": {"size": 99}})
    j = jm.wait(bad, timeout=60)
    assert j.status == "failed" and "larger than" in j.error and "Traceback" not in j.error
    ok = jm.submit("attack", config={**DIGITS, "epochs": 1.0})
    assert jm.wait(ok, timeout=120).status == "finished"


def test_defend_job_on_a_stored_run(jm):
    a = jm.wait(jm.submit("attack", config=DIGITS), timeout=120)
    d = jm.wait(jm.submit("defend", parent=a.result["run_id"], defenses=["ft", "sft"],
                          params={"ft": {"epochs": 1.0}}, clean_fraction=0.3), timeout=180)
    assert d.status == "finished", d.error
    assert d.result["poisoned"]["asr"] == a.result["asr"]
    kids = jm.store.children(a.result["run_id"])
    assert {k["name"] for k in kids} == {"ft", "sft"}
    ft = jm.store.get(d.result["defended"]["ft"]["run_id"])
    assert ft.config["clean_fraction"] == 0.3 and ft.defense["params"]["epochs"] == 1.0


def test_snapshots_are_copies(jm):
    jid = jm.submit("attack", config=DIGITS)
    snap = jm.get(jid)
    snap.series["attack"] = ["tampered"]
    jm.wait(jid, timeout=120)
    assert jm.get(jid).series["attack"] != ["tampered"]
    assert isinstance(jm.get(jid).stop_event, threading.Event)


def test_worker_collects_garbage_once_each_job_has_ended(jm, monkeypatch):
    # The dashboard turns off Streamlit's gc.collect after every rerun (.streamlit/config.toml), so the
    # worker must free a job's cyclic garbage itself, once per job, after its final status is set.
    import bdft_core.jobs as jobs_mod

    seen = []  # the jobs' statuses at each collection

    def collect(*a):
        seen.append([j.status for j in jm.list()])
        return 0

    monkeypatch.setattr(jobs_mod.gc, "collect", collect)

    def collections_after(n):
        t0 = time.monotonic()
        while len(seen) < n and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        return list(seen)

    ok = jm.submit("attack", config={**DIGITS, "epochs": 1.0})
    assert jm.wait(ok, timeout=120).status == "finished"
    assert collections_after(1) == [["finished"]]
    bad = jm.submit("attack", config={"dataset": "digits", "params": {"size": 99}})
    assert jm.wait(bad, timeout=60).status == "failed"
    assert sorted(collections_after(2)[1]) == ["failed", "finished"]
    time.sleep(0.5)
    assert len(seen) == 2  # once per job, not on every poll


def test_live_curves_of_every_stage_use_the_jobs_live_sample_size(jm, monkeypatch):
    # The dashboard's live points are measured on jobs.LIVE_SAMPLES images of each test set, in the
    # attack's trainer and in defenses that call the evaluator themselves (ANP); final figures use all.
    import bdft_core.jobs as jobs_mod
    import bdft_core.metrics as metrics_mod

    monkeypatch.setattr(jobs_mod, "LIVE_SAMPLES", 12)
    sizes, real = [], metrics_mod.accuracy

    def accuracy(model, x, y, **kw):
        sizes.append(len(y))
        return real(model, x, y, **kw)

    monkeypatch.setattr(metrics_mod, "accuracy", accuracy)
    a = jm.wait(jm.submit("attack", config={**DIGITS, "epochs": 1.0}), timeout=120)
    assert a.status == "finished", a.error
    assert sizes and set(sizes) == {12}, sizes
    sizes.clear()
    d = jm.wait(jm.submit("defend", parent=a.result["run_id"], defenses=["anp"],
                          params={"anp": {"mask_steps": 6}}, clean_fraction=0.3), timeout=180)
    assert d.status == "finished", d.error
    assert sizes and set(sizes) == {12}, sizes


def test_defend_job_where_every_defense_fails_is_failed_and_keeps_the_reasons(jm):
    a = jm.wait(jm.submit("attack", config=DIGITS), timeout=120)
    weights = jm.store.path(a.result["run_id"]) / "model.safetensors"
    weights.write_bytes(b"not a checkpoint")  # every defense fails to load the poisoned model
    d = jm.wait(jm.submit("defend", parent=a.result["run_id"], defenses=["ft", "sft"], clean_fraction=0.3),
                timeout=120)
    assert d.status == "failed" and d.error.startswith("no defense finished (2 failed, 0 skipped")
    assert d.result["defended"] == {} and [f["defense"] for f in d.result["failed"]] == ["ft", "sft"]


def test_an_unexpected_error_in_one_defense_leaves_the_others_running(jm, monkeypatch):
    from bdft_core.defenses.ft import FineTuning

    def broken(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(FineTuning, "apply", broken)
    a = jm.wait(jm.submit("attack", config=DIGITS), timeout=120)
    d = jm.wait(jm.submit("defend", parent=a.result["run_id"], defenses=["ft", "sft"], clean_fraction=0.3),
                timeout=180)
    assert d.status == "finished", d.error
    assert set(d.result["defended"]) == {"sft"}
    assert d.result["failed"] == [{"defense": "ft", "error": "unexpected error (RuntimeError): boom"}]
    assert d.run_ids == [d.result["defended"]["sft"]["run_id"]]


def test_a_demo_that_fails_in_a_defense_still_names_the_runs_it_stored(jm, monkeypatch):
    from bdft_core.defenses.sft import SuperFineTuning

    def broken(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(SuperFineTuning, "apply", broken)
    j = jm.wait(jm.submit("demo", config=DIGITS, defenses=["ft", "sft"], clean_fraction=0.2), timeout=180)
    assert j.status == "failed" and "boom" in j.error
    kinds = sorted(jm.store.get(r).kind for r in j.run_ids)
    assert kinds == ["attack", "defense"]  # the poisoned model and FT, stored before SFT failed


def test_a_sweep_job_whose_cells_all_fail_is_failed(jm):
    spec = {"name": "tiny-budget", "base": {"dataset": "digits", "attack": "badnets", "epochs": 1.0, "n_train": 40},
            "defense": "ft", "clean_fraction": 0.005, "axes": {"seed": [0]}}
    j = jm.wait(jm.submit("sweep", spec=spec, executor="process"), timeout=300)
    assert j.status == "failed" and "all 1 cell(s) run failed" in j.error and "at least 2" in j.error


def test_a_one_image_clean_budget_is_refused_with_a_reason(tmp_path):
    from bdft_core.pipeline import AttackConfig, run_attack, run_defense

    run, model = run_attack(AttackConfig(dataset="digits", epochs=1.0, n_train=40))
    with pytest.raises(ConfigError, match="gives the defender 1 image"):
        run_defense(run, "nad", clean_fraction=0.005, model=model)


def test_a_job_raising_systemexit_fails_and_the_worker_goes_on(jm, monkeypatch):
    import bdft_core.pipeline as pipeline

    def bail(*a, **k):
        raise SystemExit("library called exit()")

    monkeypatch.setattr(pipeline, "run_attack", bail)
    j = jm.wait(jm.submit("attack", config=DIGITS), timeout=60)
    assert j.status == "failed" and "SystemExit" in j.error
    monkeypatch.undo()
    assert jm.wait(jm.submit("attack", config={**DIGITS, "epochs": 1.0}), timeout=120).status == "finished"


@pytest.mark.parametrize("kind", ["demo", "defend"])
def test_a_stop_landing_after_the_work_finished_leaves_the_job_finished(jm, monkeypatch, kind):
    """The Stop click can land while the last stage closes (its final evaluation): nothing is cut
    short, every run is "finished", so the job is too, not "stopped"."""
    import bdft_core.pipeline as pl

    parent = None
    if kind == "defend":
        parent = jm.wait(jm.submit("attack", config={**DIGITS, "epochs": 1.0}), timeout=120).result["run_id"]
    real = pl.run_demo if kind == "demo" else pl.run_defense
    job = {}

    def late_stop(*a, **kw):
        out = real(*a, **kw)
        jm.stop(job["id"])  # pressed just as the work returned
        return out
    monkeypatch.setattr(pl, real.__name__, late_stop)
    if kind == "demo":
        job["id"] = jm.submit("demo", config={**DIGITS, "epochs": 1.0}, defenses=["ft"], clean_fraction=0.3)
    else:
        job["id"] = jm.submit("defend", parent=parent, defenses=["ft"], clean_fraction=0.3,
                              params={"ft": {"epochs": 1.0, "min_steps": 10}})
    j = jm.wait(job["id"], timeout=180)
    assert j.stop_event.is_set()
    assert j.status == "finished", (j.status, j.error)
    assert all(jm.store.get(r).status == "finished" for r in j.run_ids) and j.run_ids
