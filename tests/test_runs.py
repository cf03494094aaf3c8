"""Run store: atomic records, listing, loading and deleting; bad checkpoints give clear errors."""
import json
import pickle

import pytest
import torch

from bdft_core.errors import CheckpointError, RunNotFound
from bdft_core.models import build_model
from bdft_core.pipeline import AttackConfig, run_attack, run_defense
from bdft_core.runs import RunStore, load_state_checked

QUICK = dict(dataset="digits", epochs=3, model_kwargs={"widths": [8, 8, 16]}, device="cpu")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    run, model = run_attack(AttackConfig(**QUICK), store=store)
    child, _ = run_defense(run.id, "ft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.1, store=store)
    return store, run, child


def test_run_record_has_everything(stored):
    store, run, child = stored
    r = store.get(run.id)
    assert r.kind == "attack" and r.seed == 0 and r.versions["torch"] == torch.__version__
    assert {"clean_acc", "asr"} <= set(r.final) and r.history and r.timings["train_s"] > 0
    assert r.device.startswith("cpu") and r.config["poison_rate"] == 0.1
    c = store.get(child.id)
    assert c.parent == run.id and c.defense["name"] == "ft" and c.config["clean_fraction"] == 0.1
    assert c.history[0]["step"] == 0  # the defense's curve starts at the poisoned model
    rows = store.list()
    assert [x["id"] for x in rows] == [child.id, run.id] or {x["id"] for x in rows} == {child.id, run.id}
    assert store.children(run.id)[0]["id"] == child.id


def test_load_model_reproduces_metrics(stored):
    store, run, _ = stored
    from bdft_core.pipeline import attack_config_of, prepare

    from bdft_core.device import amp_dtype

    _, model = store.load_model(run.id)
    s = prepare(attack_config_of(run))  # the same precision as during training
    assert s.evaluator(model, amp_dtype=amp_dtype(s.device))["clean_acc"] == pytest.approx(run.final["clean_acc"], abs=1e-6)


def test_crash_mid_write_never_breaks_listing(stored, tmp_path):
    store = RunStore(tmp_path / "r")
    (store.root / "20260101-000000-attack-dead00").mkdir()
    (store.root / "20260101-000000-attack-dead00" / "model.safetensors").write_bytes(b"\0" * 10)
    assert store.list() == []
    with pytest.raises(RunNotFound):
        store.get("20260101-000000-attack-dead00")
    assert store.gc() == ["20260101-000000-attack-dead00"]


def test_unknown_and_invalid_run_ids(stored):
    store = stored[0]
    for rid in ("nope", "../etc", ""):
        with pytest.raises(RunNotFound):
            store.get(rid)


def _model():
    return build_model("fastnet", 10, 1, widths=(8, 8, 16))


def test_corrupt_truncated_pickled_and_mismatched_checkpoints(stored, tmp_path):
    store, run, _ = stored
    good = (store.path(run.id) / "model.safetensors").read_bytes()
    load_state_checked(_model(), good)  # the real one loads
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\x01not safetensors at all",
        "pickle": pickle.dumps({"classifier.weight": torch.zeros(2)}),
    }
    for name, blob in cases.items():
        with pytest.raises(CheckpointError, match="not a valid safetensors"):
            load_state_checked(_model(), blob, what=name)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_state_checked(build_model("fastnet", 3, 1, widths=(8, 8, 16)), good)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_state_checked(build_model("fastnet", 10, 1, widths=(8, 8, 8)), good)
    p = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        load_state_checked(_model(), p)


def test_delete_removes_children(tmp_path):
    store = RunStore(tmp_path / "r")
    run, _ = run_attack(AttackConfig(**{**QUICK, "epochs": 1}), store=store)
    child, _ = run_defense(run.id, "sft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.05, store=store)
    assert set(store.delete(run.id)) == {run.id, child.id}
    assert store.list() == [] and not store.path(run.id).exists()
    assert json.loads(json.dumps(store.list())) == []


def test_results_and_artefacts_kept_with_a_run(stored):
    store, run, _ = stored
    assert store.load_result(run.id, "sequela") is None and store.load_artefacts(run.id) == {}
    store.save_result(run.id, "sequela", {"auc": 0.5})
    store.save_artefacts(run.id, {"flagged_idx": torch.tensor([3, 1])})
    assert store.load_result(run.id, "sequela") == {"auc": 0.5}
    assert store.load_artefacts(run.id)["flagged_idx"].tolist() == [3, 1]
    (store.path(run.id) / "sequela.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        store.load_result(run.id, "sequela")
    with pytest.raises(ValueError):
        store.save_result(run.id, "../evil", {})
    with pytest.raises(RunNotFound):
        store.save_result("nope", "sequela", {})


def test_export_import_moves_a_run_between_stores(stored, tmp_path):
    """A sweep cell computed elsewhere arrives as files and becomes an ordinary run here."""
    store, run = stored[0], stored[1]
    files = store.export_run(run.id)
    assert {"run.json", "model.safetensors"} <= set(files)
    other = RunStore(tmp_path / "other")
    got = other.import_run(files)
    assert got.id == run.id and [r["id"] for r in other.list()] == [run.id]
    assert other.load_model(run.id)[0].final == run.final
    other.import_run(files)  # twice: still one run
    assert len(other.list()) == 1
    with pytest.raises(CheckpointError, match="unexpected file"):
        other.import_run({**files, "../evil.py": b"x"})
    with pytest.raises(CheckpointError, match="unreadable"):
        other.import_run({**files, "model.safetensors": b"\x80\x04pickle"})


def test_gc_keeps_sweeps_and_trigger_folders(tmp_path):
    store = RunStore(tmp_path / "r")
    for name in ("sweeps", "triggers", "20260101-000000-attack-abc123"):
        (store.root / name).mkdir()
    assert store.gc() == ["20260101-000000-attack-abc123"]
    assert (store.root / "sweeps").is_dir() and (store.root / "triggers").is_dir()


def test_a_stored_run_keeps_the_attack_defaults_it_was_made_with(stored):
    """A run made when Blended's default pattern was uniform noise is rebuilt with noise, not with
    today's default (the record keeps every resolved setting); settings the user gave still win."""
    import dataclasses

    from bdft_core.attacks import build_attack
    from bdft_core.pipeline import attack_config_of, prepare

    _, run, _ = stored
    old = dataclasses.replace(run, attack={**run.attack, "name": "blended", "params": {"alpha": 0.2, "pattern": "noise"}},
                              config={**run.config, "attack": "blended", "params": {"alpha": 0.3}})
    cfg = attack_config_of(old)
    assert cfg.attack == "blended" and cfg.params == {"alpha": 0.3, "pattern": "noise"}
    s = prepare(cfg)
    noise = build_attack("blended", s.data.image_shape, s.data.num_classes, seed=cfg.seed, pattern="noise")
    assert torch.equal(s.attack.pattern, noise.pattern) and s.attack.params["alpha"] == 0.3
    # a setting recorded only as a description of an image object is not fed back
    desc = dataclasses.replace(old, attack={**old.attack, "params": {"pattern": "<ndarray image>"}},
                               config={**old.config, "params": {}})
    assert attack_config_of(desc).params == {}
    # the run's own attack (BadNets, all defaults): the recorded settings are today's defaults
    assert attack_config_of(run).params == run.attack["params"]


def _strict(text):
    def no_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=no_constant)


def test_records_are_strict_json_nan_becomes_null(stored):
    """A defense's first history row has no loss yet (NaN): run.json and the CLI's --json hold null
    there, which jq or JavaScript can read, not Python's bare NaN."""
    from bdft_core.runs import dumps, finite_json

    store, _, child = stored
    rec = _strict((store.path(child.id) / "run.json").read_text())
    assert rec["history"][0]["step"] == 0 and rec["history"][0]["loss"] is None
    assert finite_json({"a": [1.0, float("nan"), {"b": float("inf")}], "c": "x"}) == {"a": [1.0, None, {"b": None}], "c": "x"}
    assert _strict(dumps({"t": torch.tensor([1.0, float("-inf")])})) == {"t": [1.0, None]}


def test_delete_needs_neither_a_readable_record_nor_the_folder(stored, tmp_path):
    src, run, child = stored
    store = RunStore(tmp_path / "r")
    for rid in (run.id, child.id):
        store.import_run(src.export_run(rid))
    (store.path(child.id) / "run.json").write_text("{broken")  # a damaged defense record
    assert store.delete(run.id) == [child.id, run.id]  # the parent takes its damaged child with it
    assert store.list() == [] and not store.path(child.id).exists()
    store.import_run(src.export_run(run.id))
    import shutil

    shutil.rmtree(store.path(run.id))  # a folder removed by hand: its index row can still go
    assert [r["id"] for r in store.list()] == [run.id]
    assert store.delete(run.id) == [run.id] and store.list() == []
    with pytest.raises(RunNotFound):
        store.delete(run.id)


def test_an_unreadable_index_is_kept_aside_and_rebuilt_from_the_run_folders(stored, tmp_path):
    src, run, child = stored
    store = RunStore(tmp_path / "r")
    for rid in (run.id, child.id):
        store.import_run(src.export_run(rid))
    broken = tmp_path / "r" / "20260101-000000-attack-bad000"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"x")
    store.index.write_bytes(b"this is not a database")
    again = RunStore(tmp_path / "r")
    assert {r["id"] for r in again.list()} == {run.id, child.id}
    assert again.children(run.id)[0]["id"] == child.id
    assert again.rebuilt["skipped"][0].startswith(broken.name)
    assert (tmp_path / "r" / again.rebuilt["moved_to"]).read_bytes() == b"this is not a database"  # nothing lost
    assert RunStore(tmp_path / "r").rebuilt is None  # rebuilt once


def test_run_ids_cannot_name_the_stores_own_files(stored, tmp_path):
    """A run id comes from a file when a run is imported: only the form new_run_id makes is a run."""
    src, run, _ = stored
    store = RunStore(tmp_path / "r")
    (store.root / "sweeps").mkdir()
    (store.root / "sweeps" / "grid.json").write_text("{}")
    for rid in ("sweeps", "index.sqlite", "triggers", "..", "a b ü", 123, None):
        with pytest.raises(RunNotFound, match="no stored run"):
            store.path(rid)
    files = src.export_run(run.id)
    rec = json.loads(files["run.json"])
    with pytest.raises(RunNotFound):
        store.import_run({**files, "run.json": json.dumps({**rec, "id": "sweeps"}).encode()})
    assert (store.root / "sweeps" / "grid.json").is_file() and store.list() == []


def test_import_refuses_weights_that_do_not_fit_the_record(stored, tmp_path):
    from safetensors.torch import save as st_save

    src, run, _ = stored
    store = RunStore(tmp_path / "r")
    files = src.export_run(run.id)
    other = st_save({k: v.contiguous() for k, v in build_model("fastnet", 3, 1, widths=(8, 8, 16)).state_dict().items()})
    with pytest.raises(CheckpointError, match="does not fit"):
        store.import_run({**files, "model.safetensors": other})
    rec = json.loads(files["run.json"])
    huge = {**rec, "model": {**rec["model"], "num_classes": 3_000_000}}  # checked on the meta device: no memory
    with pytest.raises(CheckpointError, match="does not fit"):
        store.import_run({**files, "run.json": json.dumps(huge).encode()})
    assert store.list() == [] and not store.path(run.id).exists()


@pytest.mark.parametrize("change", [{"model": {}}, {"config": None}, {"id": 5}, {"history": "x"}])
def test_a_record_with_wrong_fields_is_reported_not_a_traceback(stored, tmp_path, change):
    src, run, _ = stored
    store = RunStore(tmp_path / "r")
    store.import_run(src.export_run(run.id))
    p = store.path(run.id) / "run.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    with pytest.raises(CheckpointError, match="unreadable"):
        store.get(run.id)


def test_artefacts_are_on_disk_before_the_run_is_listed(stored, tmp_path, monkeypatch):
    """A defense's artefacts (reversed triggers, flagged indices) are written with its weights, before
    the index row: a crash in between can no longer leave a listed run without them."""
    src, run, _ = stored
    store = RunStore(tmp_path / "r")
    rec, model = src.load_model(run.id)
    at_index = []
    real = store._index
    monkeypatch.setattr(store, "_index", lambda r: at_index.append(sorted(p.name for p in store.path(r.id).iterdir()))
                        or real(r))
    store.save(rec, model, artefacts={"flagged_idx": torch.tensor([4, 2])})
    assert at_index == [["artefacts.safetensors", "model.safetensors", "run.json"]]
    assert store.load_artefacts(rec.id)["flagged_idx"].tolist() == [4, 2]


# -- hostile or damaged stores and uploads (each found by trying it) -----------------------------------

def _copy_store(stored, tmp_path):
    import shutil

    store, run, child = stored
    shutil.copytree(store.root, tmp_path / "runs")
    return RunStore(tmp_path / "runs"), run, child


def test_an_upload_whose_record_says_clean_acc_high_is_refused_and_listing_still_works(stored, tmp_path):
    import struct

    from bdft_core.uploads import import_checkpoint

    store, run, _ = _copy_store(stored, tmp_path)
    good = (store.path(run.id) / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    for where, value in (("final", "high"), ("final", [1]), ("attack", ["x"])):
        header = json.loads(good[8:8 + n])
        rec = json.loads(header["__metadata__"]["run"])
        rec["id"] = "20300101-000000-attack-abcdef"
        if where == "final":
            rec["final"]["clean_acc"] = value
        else:
            rec["attack"]["name"] = value
        header["__metadata__"]["run"] = json.dumps(rec)
        b = json.dumps(header).encode()
        with pytest.raises(CheckpointError, match="record is damaged"):
            import_checkpoint(struct.pack("<Q", len(b)) + b + good[8 + n:], store, filename="evil.safetensors")
    assert len(store.list()) == 2 and not (store.root / "20300101-000000-attack-abcdef").exists()


def test_an_emptied_index_is_rebuilt_from_the_run_folders(stored, tmp_path):
    store, run, child = _copy_store(stored, tmp_path)
    store.index.write_bytes(b"")  # sqlite reads a zero-byte file as a new, empty database
    again = RunStore(store.root)
    assert {r["id"] for r in again.list()} == {run.id, child.id} and again.rebuilt["indexed"]
    assert RunStore(store.root).rebuilt is None  # rebuilt once; an empty store stays as it is
    assert RunStore(tmp_path / "fresh").list() == []


def test_importing_another_run_under_a_stored_id_is_refused(stored, tmp_path):
    store, run, _ = _copy_store(stored, tmp_path)
    files = store.export_run(run.id)
    store.import_run(files)  # the same run again: harmless
    before = (store.path(run.id) / "model.safetensors").read_bytes()
    other = RunStore(tmp_path / "other")
    r2, _ = run_attack(AttackConfig(**{**QUICK, "seed": 5}), store=other)
    forged = {**other.export_run(r2.id), "run.json": files["run.json"]}  # other weights, this run's record
    with pytest.raises(CheckpointError, match="already stored here with other weights"):
        store.import_run(forged)
    assert (store.path(run.id) / "model.safetensors").read_bytes() == before


def test_hand_edited_records_and_converted_weights_are_refused_before_anything_is_built(stored, tmp_path):
    from safetensors.torch import load_file, save_file

    store, run, _ = _copy_store(stored, tmp_path)
    p = store.path(run.id) / "run.json"
    rec = json.loads(p.read_text())
    rec["model"]["kwargs"] = {"widths": [10 ** 6] * 3}  # would ask for terabytes
    p.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match="widths .* out of range"):
        store.load_model(run.id)
    rec["model"]["kwargs"] = {}
    p.write_text(json.dumps({**rec, "model": json.loads((stored[0].path(run.id) / "run.json").read_text())["model"]}))
    w = store.path(run.id) / "model.safetensors"
    save_file({k: v.to(torch.int8) if v.is_floating_point() else v for k, v in load_file(str(w)).items()}, str(w))
    with pytest.raises(CheckpointError, match="wrong kind of number"):
        store.load_model(run.id)


def test_a_runs_folder_that_is_a_file_or_read_only_says_so(tmp_path, monkeypatch):
    from bdft_core.errors import ConfigError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file: point BDFT_RUNS_DIR"):
        RunStore(tmp_path / "afile")
    store = RunStore(tmp_path / "ro")
    import os

    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as for a user without write permission
    t = []
    with pytest.raises(ConfigError, match="read-only, so a run could not be kept"):
        run_attack(AttackConfig(**QUICK), store=store, callbacks=[("on_batch", t.append)])
    assert not t  # said before any training step
