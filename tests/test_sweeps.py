"""Sweeps: grid files, cells, execution through a local Ray instance and a process pool, resuming
after a kill, the CLI."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bdft_core.errors import ConfigError
from bdft_core.runs import RunStore
from bdft_core.sweeps import SweepSpec, estimate, list_sweeps, run_sweep, sweep_rows

ROOT = Path(__file__).resolve().parents[1]
GRID = {"name": "digits-222", "base": {"dataset": "digits", "attack": "badnets"},
        "axes": {"poison_rate": [0.05, 0.2], "clean_fraction": [0.05, 0.2], "defense": ["ft", "sft"]}}


def spec(**over):
    return SweepSpec.from_dict({**json.loads(json.dumps(GRID)), **over})


# -- grid files and cells ---------------------------------------------------------------------------

def test_cells_expand_in_grid_order_and_share_trainings():
    s = spec()
    cells = s.cells()
    assert s.n_cells == len(cells) == 8
    assert [c.values for c in cells[:3]] == [{"poison_rate": 0.05, "clean_fraction": 0.05, "defense": "ft"},
                                              {"poison_rate": 0.05, "clean_fraction": 0.05, "defense": "sft"},
                                              {"poison_rate": 0.05, "clean_fraction": 0.2, "defense": "ft"}]
    assert cells[0].attack["poison_rate"] == 0.05 and cells[0].clean_fraction == 0.05
    units = s.attack_units()
    assert len(units) == 2 and sorted(map(len, units.values())) == [4, 4]  # 2 poisoned trainings, 4 defenses each
    assert len({c.key for c in cells}) == 8


def test_cell_keys_are_content_so_an_extended_grid_reuses_cells():
    a = {c.key for c in spec().cells()}
    b = spec(axes={**GRID["axes"], "poison_rate": [0.05, 0.2, 0.3]}).cells()
    assert a < {c.key for c in b} and len(b) == 12
    renamed = {c.key for c in spec(name="other").cells()}
    assert renamed == a  # the name is where results live, not what they are


def test_trigger_and_defense_settings_axes():
    s = spec(axes={"trigger.size": [2, 3], "defense.lr": [0.01, 0.02]}, defense="ft")
    cells = s.cells()
    assert [c.attack["params"] for c in cells] == [{"size": 2}, {"size": 2}, {"size": 3}, {"size": 3}]
    assert [c.defense_params for c in cells] == [{"lr": 0.01}, {"lr": 0.02}] * 2
    assert len(s.attack_units()) == 2


@pytest.mark.parametrize("over, reason", [
    ({"axes": {}}, "no axes"),
    ({"axes": {"colour": [1, 2]}}, "unknown sweep axis 'colour'"),
    ({"axes": {"poison_rate": []}}, "non-empty list"),
    ({"axes": {"poison_rate": [0.1, 0.1]}}, "repeats a value"),
    ({"axes": {"poison_rate": [0.1, 1.5]}}, "poison rate"),
    ({"axes": {"clean_fraction": [0.0, 0.2]}}, "clean fraction"),
    ({"axes": {"defense": ["ft", "magic"]}}, "unknown defense 'magic'"),
    ({"axes": {"attack": ["badnets", "nope"]}}, "unknown attack 'nope'"),
    ({"axes": {"trigger.size": [3, 40]}}, "larger than"),
    ({"axes": {"defense": ["ft", "sft"], "defense.lr": [0.01]}}, "sft has no parameter.*lr"),
    ({"axes": {"clean_fraction": [0.1, 0.2], "defense": ["none"]}}, "same experiment"),
    ({"axes": {"defense.lr": [0.1, 0.2], "defense": ["none"]}}, "defense.lr varies"),
    ({"axes": {"defense": ["none", "ft"]}, "defense_params": {"none": {"lr": 1}}}, "defense .none. has no settings"),
    ({"axes": {"seed": [0]}, "colour": 1}, "unknown grid setting"),
    ({"axes": {"poison_rate": [[1], [2]]}}, r"poison_rate must be a number, got \[1\]"),
    ({"axes": {"seed": [0]}, "base": {"dataset": "digits", "params": "x"}}, "base.params must be a table of settings"),
    ({"axes": {"seed": [0]}, "name": "../etc"}, "sweep name"),
    ({"axes": {"seed": [0]}, "threads_per_cell": 0}, "threads_per_cell"),
])
def test_bad_grids_say_what_is_wrong(over, reason):
    with pytest.raises(ConfigError, match=reason):
        spec(**over)


def test_grid_files_json_and_toml(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text('defense = "sft"\n[base]\ndataset = "digits"\n[axes]\npoison_rate = [0.05, 0.2]\nseed = [0, 1]\n')
    s = SweepSpec.load(toml)
    assert s.name == "g" and s.n_cells == 4 and s.defense == "sft"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SweepSpec.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        SweepSpec.load(tmp_path / "missing.json")


def test_estimate_before_any_run_counts_cells_and_guesses():
    e = estimate(spec(), RunStore())
    assert (e["cells"], e["done"], e["trainings_to_run"], e["defenses_to_run"]) == (8, 0, 2, 8)
    assert e["basis"].startswith("first guesses") and e["seconds"] > 0
    # a slice of the training set is guessed in proportion to the whole set (digits: 1,437 images)
    full = estimate(spec(name="full", axes={"defense": ["none"]}), RunStore())["seconds"]
    half = estimate(SweepSpec.from_dict({**GRID, "name": "half", "axes": {"defense": ["none"]},
                                         "base": {**GRID.get("base", {}), "n_train": 700}}), RunStore())["seconds"]
    assert half == pytest.approx(full * 700 / 1437)


def test_estimate_scales_stored_runs_to_each_cells_size(tmp_path):
    """Stored runs give seconds per training image; a cell on 4 epochs over a 700-image slice, and a
    defense on 10% of that slice, are estimated from them in proportion, not at the stored runs'
    own seconds (nor, for the defense, only in proportion to its clean images: its minimum steps count)."""
    import torch

    from bdft_core.runs import Run, new_run_id

    store = RunStore(tmp_path / "runs")
    tiny = torch.nn.Linear(2, 2)
    spec_ = {"name": "fastnet", "num_classes": 10, "channels": 1, "image_size": [8, 8], "kwargs": {}}
    # 2 epochs over the whole training set (1,437 images) in 10 s; FT on 287 clean images in 4 s
    a = Run(id=new_run_id("attack"), kind="attack", created=1.0, dataset="digits", model=spec_,
            attack={"name": "badnets"}, config={"epochs": 2.0, "n_train": None}, seed=0, device="cpu",
            final={"clean_acc": 0.9, "asr": 1.0}, timings={"total_s": 10.0, "train_s": 9.0, "images_per_s": 2874 / 9.0})
    store.save(a, tiny)
    d = Run(id=new_run_id("defense"), kind="defense", created=2.0, dataset="digits", model=spec_, parent=a.id,
            attack=a.attack, defense={"name": "ft"}, config={"clean_fraction": 0.2, "n_clean": 287}, seed=0,
            device="cpu", final={"clean_acc": 0.9, "asr": 0.1},
            timings={"total_s": 4.0, "train_s": 3.0, "images_per_s": 1148 / 3.0})
    store.save(d, tiny)
    grid = SweepSpec.from_dict({"name": "sized", "base": {"dataset": "digits", "attack": "badnets", "epochs": 4,
                                                          "n_train": 700},
                                "defense": "ft", "axes": {"clean_fraction": [0.1]}})
    e = estimate(grid, store)
    assert e["basis"] == "stored runs" and e["trainings_to_run"] == 1 and e["defenses_to_run"] == 1
    # FT on 70 clean images: 2 steps an epoch, so its 60-step minimum makes 30 epochs, 2,100 images
    expected = 10.0 / 2874 * 4 * 700 + 4.0 / 1148 * 30 * 70
    assert e["seconds"] * e["parallel"] == pytest.approx(expected)


# -- running through Ray ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_sweep(tmp_path_factory):
    pytest.importorskip("ray")
    store = RunStore(tmp_path_factory.mktemp("sweep") / "runs")
    seen = []
    res = run_sweep(spec(), store, executor="ray", on_cell=seen.append)
    return store, res, seen


def test_ray_sweep_runs_every_cell_as_stored_runs(ray_sweep):
    store, res, seen = ray_sweep
    assert res.executor == "ray" and res.where == "local Ray instance" and not res.failed
    assert len(res.ran) == 8 and res.trainings_ran == 2 and res.reused == []
    assert len(seen) == 8 and all(r["status"] == "finished" for r in seen)  # each cell reported as it finished
    rows = sweep_rows(store, spec())
    assert len(store.list(kind="attack")) == 2 and len(store.list(kind="defense")) == 8
    for r in rows:  # every cell is an ordinary run, its figures those of the stored run
        d = store.get(r["defense_run"])
        assert d.parent == r["attack_run"] and d.defense["name"] == r["defense"]
        assert d.config["clean_fraction"] == r["clean_fraction"]
        assert d.final["asr"] == pytest.approx(r["asr"]) and d.final["clean_acc"] == pytest.approx(r["clean_acc"])
        assert store.get(r["attack_run"]).attack["poison_rate"] == r["poison_rate"]
        assert r["poisoned_asr"] > 0.9  # the backdoor works in every poisoned model
    mean = lambda name: sum(r["asr"] for r in rows if r["defense"] == name) / 4  # noqa: E731
    assert mean("sft") < mean("ft") - 0.3  # the paper's finding, visible on digits too
    assert list_sweeps(store)[0] | {"updated": 0} == {"name": "digits-222", "cells": 8, "done": 8, "updated": 0,
                                                      "axes": ["poison_rate", "clean_fraction", "defense"]}


def test_rerunning_a_finished_sweep_runs_nothing(ray_sweep):
    store, res, _ = ray_sweep
    again = run_sweep(spec(), store, executor="ray")
    assert again.ran == [] and sorted(again.reused) == sorted(res.ran) and again.executor == ""
    assert len(store.list(kind="defense")) == 8
    e = estimate(spec(), store)
    assert e["done"] == 8 and e["seconds"] == 0


def test_process_pool_gives_the_same_cells_and_stops_cleanly(ray_sweep, tmp_path):
    """Without Ray the same tasks run on a process pool: same cell keys, same figures; a stop keeps
    the finished cells and the next call runs only the rest."""
    ray_store = ray_sweep[0]
    sub = spec(name="pool", axes={"poison_rate": [0.2], "clean_fraction": [0.2], "defense": ["ft", "sft", "none"]})
    store = RunStore(tmp_path / "pool")
    stop = threading.Event()
    first = run_sweep(sub, store, executor="process", on_cell=lambda row: stop.set(), stop=stop)
    assert first.stopped and first.executor == "process" and 1 <= len(first.ran) < 3
    second = run_sweep(sub, store, executor="process")
    assert sorted(second.reused) == sorted(first.ran) and sorted(first.ran + second.ran) == sorted(c.key for c in sub.cells())
    by_key = {r["cell"]: r for r in sweep_rows(ray_store, spec())}
    for r in sweep_rows(store, sub):
        if r["defense"] == "none":  # the poisoned model itself, no defense run
            assert r["defense_run"] is None and r["asr"] == r["poisoned_asr"]
            continue
        ref = by_key[r["cell"]]  # the same experiment, computed by Ray in the other store
        assert r["asr"] == pytest.approx(ref["asr"], abs=1e-6) and r["clean_acc"] == pytest.approx(ref["clean_acc"], abs=1e-6)
    # a cell whose defense run was deleted since is missing again: in the rows, the estimate and a resume
    gone = next(r for r in sweep_rows(store, sub) if r["defense"] == "ft")
    store.delete(gone["defense_run"])
    assert {r["cell"]: r for r in sweep_rows(store, sub)}[gone["cell"]]["status"] == "missing"
    e = estimate(sub, store)
    assert e["done"] == 2 and e["defenses_to_run"] == 1 and e["trainings_to_run"] == 0 and e["seconds"] > 0
    assert run_sweep(sub, store, executor="process").ran == [gone["cell"]]


def test_a_stop_keeps_the_cells_that_had_already_finished(tmp_path, monkeypatch):
    """Results that arrived before the stop was seen are recorded, not cancelled with the rest: here
    both defenses have finished when the first is reported, and that report sets the stop."""
    from bdft_core.sweeps import runner

    class Inline:  # runs each task at once, then hands the results out one per wait()
        name, where, resources = "inline", "this process", {}

        def __init__(self):
            self.events = []

        def put(self, payload):
            return payload

        def submit_attack(self, tag, cfg):
            self.events.append((tag, runner.attack_task(cfg), None))

        def submit_defense(self, tag, parent, cell):
            self.events.append((tag, runner.defense_task(parent, cell.defense, cell.defense_params,
                                                         cell.clean_fraction), None))

        def wait(self, timeout):
            return [self.events.pop(0)] if self.events else []

        def drain(self):
            out, self.events = self.events, []
            return out

        def busy(self):
            return bool(self.events)

        def cancel(self):
            self.events.clear()

        def close(self):
            pass

    monkeypatch.setattr(runner, "_task_env", lambda threads: None)  # keep this process's threads
    monkeypatch.setattr(runner, "pick_backend", lambda spec, executor="auto", address=None: Inline())
    store = RunStore(tmp_path / "runs")
    sub = spec(name="drain", axes={"poison_rate": [0.2], "clean_fraction": [0.2], "defense": ["ft", "sft"]})
    stop = threading.Event()
    res = run_sweep(sub, store, on_cell=lambda row: stop.set(), stop=stop)
    assert res.stopped and len(res.ran) == 2 and not res.failed
    assert all(r["status"] == "finished" for r in sweep_rows(store, sub))


def test_a_dead_pool_worker_fails_its_cell_instead_of_hanging_the_sweep(tmp_path, monkeypatch):
    """A worker killed mid-task (as the kernel's out-of-memory killer would) never reports back; the
    sweep must end with that cell failed and missing, not wait for it for ever."""
    import multiprocessing as mp

    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # the task's private run store appears here once it runs
    store = RunStore(tmp_path / "runs")
    sub = SweepSpec.from_dict({"name": "killed", "base": {"dataset": "digits", "attack": "badnets", "epochs": 300.0},
                               "axes": {"defense": ["none"]}})
    out = {}
    t = threading.Thread(target=lambda: out.update(res=run_sweep(sub, store, executor="process")), daemon=True)
    t.start()
    t0 = time.monotonic()
    while not list(work.rglob("bdft-cell-*")):
        assert time.monotonic() - t0 < 120, "the task never started"
        time.sleep(0.1)
    time.sleep(1)  # the worker is in its task now
    for child in mp.active_children():
        os.kill(child.pid, signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive(), "the sweep hung on its dead worker"
    res = out["res"]
    assert res.ran == [] and len(res.failed) == 1 and "worker process died" in res.failed[0]["error"]
    assert [r["status"] for r in sweep_rows(store, sub)] == ["missing"]


def test_a_stop_ends_the_pool_workers_at_once(tmp_path, monkeypatch):
    """A stopped sweep kills its running workers (a task checks no stop flag): nothing keeps computing a
    result that will be thrown away, and the process can exit."""
    import multiprocessing as mp

    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # the sweep's temporary folders go here
    store = RunStore(tmp_path / "runs")
    sub = SweepSpec.from_dict({"name": "stopped", "base": {"dataset": "digits", "attack": "badnets", "epochs": 300.0},
                               "axes": {"defense": ["none"]}})
    stop, out = threading.Event(), {}
    t = threading.Thread(target=lambda: out.update(res=run_sweep(sub, store, executor="process", stop=stop)),
                         daemon=True)
    t.start()
    t0 = time.monotonic()
    while not list(work.rglob("bdft-cell-*")):
        assert time.monotonic() - t0 < 120, "the task never started"
        time.sleep(0.1)
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive() and out["res"].stopped and out["res"].ran == []
    assert mp.active_children() == []  # the worker was killed, not left training for minutes
    assert list(work.iterdir()) == []  # and its cell's temporary run store did not stay behind


def test_a_transfer_training_imports_its_attacker_before_its_victims(tmp_path):
    """Imported in the order the task lists them, a kill between two imports must not leave a victim
    whose attacker is missing (every resume then failed on it); a record whose chain is broken is run
    again."""
    from bdft_core.sweeps import runner
    from bdft_core.sweeps.runner import SweepRecords

    out = runner.attack_task({"dataset": "digits", "paradigm": "transfer", "epochs": 1.0,
                              "paradigm_params": {"head_epochs": 0.5, "full_epochs": 0.5}})
    kinds = [json.loads(files["run.json"])["kind"] for files in out["runs"].values()]
    assert kinds[0] == "attack" and set(kinds[1:]) == {"victim"}
    store = RunStore(tmp_path / "runs")
    victims = [f for f in out["runs"].values() if json.loads(f["run.json"])["kind"] == "victim"]
    for files in victims:  # as if killed before the attacker's import (the old order)
        store.import_run(files)
    rec = SweepRecords(store, "t")
    rec.put_attack("k", {"run_id": out["run_id"]})
    assert rec.valid_attack("k") is None and rec.attack("k") is None  # dropped: run again on resume


# -- resuming after a kill -------------------------------------------------------------------------

def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "bdft_core", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_killed_sweep_resumes_with_only_the_missing_cells(tmp_path):
    pytest.importorskip("ray")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**GRID, "name": "killme"}))
    env = {**os.environ, "BDFT_RUNS_DIR": str(tmp_path / "runs"), "BDFT_THREADS": "1"}
    cells_dir = tmp_path / "runs" / "sweeps" / "killme" / "cells"
    p = _cli(["sweep", "--grid", str(grid), "--json"], env, start_new_session=True)
    t_end = time.monotonic() + 300
    try:
        while time.monotonic() < t_end and p.poll() is None:
            if len(list(cells_dir.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert p.poll() is None, f"the sweep ended before it could be killed: {p.communicate()[1][-2000:]}"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver, its local Ray instance and the workers
        p.wait()
    done = {f.stem: f.read_bytes() for f in cells_dir.glob("*.json")}
    assert 2 <= len(done) < 8
    r = _cli(["sweep", "--grid", str(grid), "--json"], env)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    all_keys = {c.key for c in spec(name="killme").cells()}
    store = RunStore(tmp_path / "runs")
    valid = set(res["reused"])  # a record whose runs never landed (killed between the two writes) is redone
    assert valid <= set(done) and len(valid) >= len(done) - 1
    assert set(res["ran"]) == all_keys - valid  # only the missing cells ran
    for k in valid:  # finished cells untouched
        assert (cells_dir / f"{k}.json").read_bytes() == done[k]
    assert res["done"] == 8 and all(row["status"] == "finished" for row in res["rows"])
    defended = store.list(kind="defense")
    assert len(defended) == 8 and {d["id"] for d in defended} == {row["defense_run"] for row in res["rows"]}
    assert len(store.list(kind="attack")) == 2  # each result present once


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_sweep_estimate_and_bad_grid(tmp_path):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps(GRID))
    env = {**os.environ, "BDFT_RUNS_DIR": str(tmp_path / "runs")}
    r = subprocess.run([sys.executable, "-m", "bdft_core", "sweep", "--grid", str(grid), "--estimate", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout.strip().splitlines()[-1])
    assert est["cells"] == 8 and est["trainings_to_run"] == 2 and est["defenses_to_run"] == 8
    grid.write_text(json.dumps({**GRID, "axes": {"defense": ["ft", "magic"]}}))
    r = subprocess.run([sys.executable, "-m", "bdft_core", "sweep", "--grid", str(grid), "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown defense 'magic'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bdft_core", "sweep"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--grid FILE" in r.stderr


def test_sweep_on_a_ray_cluster_given_its_address(tmp_path):
    """The cluster path: a separate Ray head (`ray start`), reached through RAY_ADDRESS; the code travels
    as the job's working_dir and the cells' runs come back into the local store."""
    pytest.importorskip("ray")
    import shutil
    import socket

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import secrets

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # the cluster's token
    start = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        grid = tmp_path / "g.json"
        sub = {**GRID, "name": "on-cluster", "axes": {"poison_rate": [0.2], "clean_fraction": [0.2],
                                                      "defense": ["ft", "sft"]}}
        grid.write_text(json.dumps(sub))
        r = subprocess.run([sys.executable, "-m", "bdft_core", "sweep", "--grid", str(grid), "--json"], cwd=ROOT,
                           env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "BDFT_RUNS_DIR": str(tmp_path / "runs")},
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["where"] == f"Ray cluster at 127.0.0.1:{port}" and len(res["ran"]) == 2 and res["done"] == 2
        store = RunStore(tmp_path / "runs")
        assert {row["defense_run"] for row in res["rows"]} == {d["id"] for d in store.list(kind="defense")}
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_reading_rows_while_a_cell_lands_keeps_its_record(tmp_path):
    """run_sweep writes a cell's record just before it imports the cell's runs; a page reading the rows
    in between sees the cell as missing for a moment, but must not delete its record (it did, and a
    finished sweep then showed a missing cell and a Resume button)."""
    from bdft_core.sweeps import SweepRecords

    store = RunStore(tmp_path / "runs")
    sub = spec(name="landing", axes={"defense": ["ft"]})
    cell = sub.cells()[0]
    rec = SweepRecords(store, sub.name)
    rec.put_cell(cell.key, {"attack_run": "20260101-000000-attack-abc123",
                            "defense_run": "20260101-000000-defense-abc123", "poisoned": {}, "defended": {}})
    assert sweep_rows(store, sub)[0]["status"] == "missing"  # its runs are not imported yet
    assert estimate(sub, store)["done"] == 0
    assert rec.cell(cell.key) is not None  # the record is still there for the import to complete
    assert rec.valid_cell(cell.key) is None and rec.cell(cell.key) is None  # run_sweep's own check drops it


def test_the_forms_grid_mixes_no_defense_with_budgets_and_applies_a_rate_only_where_it_fits():
    """The Sweeps page's grid: 'no defense' beside SFT at two budgets is the undefended baseline in
    each budget's column (not "the same experiment"); a fine-tuning rate goes to the defenses with
    one learning rate, and SFT keeps its schedule."""
    from bdft_core.sweeps import NONE, SweepSpec, grid_from_choices

    def grid(**over):
        args = dict(name="form", dataset="digits", attacks=["badnets"], poison_rates=[0.1],
                    defenses=[NONE, "sft"], clean_fractions=[0.05, 0.2])
        return SweepSpec.from_dict(grid_from_choices(**{**args, **over})).validate()

    cells = grid().cells()
    assert sorted((c.defense, c.clean_fraction) for c in cells) == [(NONE, 0.05), (NONE, 0.2), ("sft", 0.05),
                                                                      ("sft", 0.2)]
    assert len({c.key for c in cells}) == 4 and len({c.attack_key for c in cells}) == 1  # one training
    cells = grid(defenses=["ft", "sft"], clean_fractions=[0.2], defense_lrs=[0.02]).cells()
    assert {c.defense: c.defense_params for c in cells} == {"ft": {"lr": 0.02}, "sft": {}}
    cells = grid(defenses=["ft", NONE], clean_fractions=[0.2], defense_lrs=[0.01, 0.02]).cells()
    assert sorted(c.defense_params.get("lr", 0) for c in cells if c.defense == "ft") == [0.01, 0.02]
    with pytest.raises(ConfigError, match="sft has no single learning rate"):
        grid(defenses=["ft", "sft"], defense_lrs=[0.01, 0.02])
    with pytest.raises(ConfigError, match="none of the chosen defenses has one"):
        grid(defenses=["sft"], defense_lrs=[0.01])
    # a choice left half-made is said, not silently dropped
    with pytest.raises(ConfigError, match="at least one paradigm"):
        grid(paradigms=[])
    with pytest.raises(ConfigError, match="give the values of size"):
        grid(trigger=("size", []))
