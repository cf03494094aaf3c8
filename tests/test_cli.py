"""The CLI: --json prints one JSON object last; bad input exits non-zero with one line, no trace."""
import json
import os
import subprocess
import sys

import pytest

from bdft_core.defenses import DEFENSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bdft_core", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=600)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    r = cli("--runs-dir", str(runs), "demo", "--dataset", "digits", "--json")
    assert r.returncode == 0, r.stderr
    return runs, last_json(r.stdout), r


def test_demo_json_contract(demo):
    runs, out, r = demo
    assert {"dataset", "attack", "device", "run_id", "poisoned", "defended", "seconds"} <= set(out)
    assert out["stored"] is True
    assert set(out["defended"]) == {"ft", "sft"}
    for fig in (out["poisoned"], *out["defended"].values()):
        assert 0.0 <= fig["clean_acc"] <= 1.0 and 0.0 <= fig["asr"] <= 1.0
    assert out["poisoned"]["asr"] > 0.9  # the backdoor is in
    assert "step" in r.stderr  # progress went to stderr, stdout stays machine-readable


def test_runs_list_show_delete(demo):
    runs, out, _ = demo
    r = cli("--runs-dir", str(runs), "runs", "list", "--json")
    ids = {row["id"] for row in last_json(r.stdout)["runs"]}
    assert out["run_id"] in ids and {d["run_id"] for d in out["defended"].values()} <= ids
    shown = last_json(cli("--runs-dir", str(runs), "runs", "show", out["run_id"], "--json").stdout)
    assert shown["id"] == out["run_id"] and len(shown["children"]) == 2


def test_demo_no_store_says_so(tmp_path):
    r = cli("--runs-dir", str(tmp_path), "demo", "--dataset", "digits", "--epochs", "1", "--defenses", "ft",
            "--no-store", "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["stored"] is False and out["run_id"]  # an id was made, and the output says it was not kept
    listed = last_json(cli("--runs-dir", str(tmp_path), "runs", "list", "--json").stdout)
    assert listed["runs"] == []


def test_attack_then_defend(tmp_path):
    a = cli("--runs-dir", str(tmp_path), "attack", "--dataset", "digits", "--attack", "blended", "--epochs", "3",
            "--param", "alpha=0.3", "--json")
    assert a.returncode == 0, a.stderr
    ra = last_json(a.stdout)
    d = cli("--runs-dir", str(tmp_path), "defend", "--run", ra["run_id"], "--defense", "ft", "--clean-fraction", "0.1",
            "--param", "epochs=1", "--json")
    assert d.returncode == 0, d.stderr
    rd = last_json(d.stdout)
    assert rd["parent"] == ra["run_id"] and rd["before"]["asr"] == ra["asr"] and 0 <= rd["asr"] <= 1
    from bdft_core.runs import RunStore

    assert RunStore(tmp_path).get(rd["run_id"]).defense["paper"] == DEFENSES["ft"].paper  # as attack records do
    assert "membership" in cli("sequela", "--help").stdout  # the axes are named where they are asked for
    gone = last_json(cli("--runs-dir", str(tmp_path), "runs", "delete", ra["run_id"], "--json").stdout)
    assert set(gone["deleted"]) == {ra["run_id"], rd["run_id"]}


@pytest.mark.parametrize("args,reason", [
    (["attack", "--dataset", "digits", "--attack", "trojan"], "unknown attack"),
    (["attack", "--dataset", "digits", "--poison-rate", "1.5"], "poison rate"),
    (["attack", "--dataset", "digits", "--param", "size=9"], "larger than"),
    (["demo", "--dataset", "digits", "--clean-fraction", "0"], "clean fraction"),
    (["attack", "--dataset", "svhn"], "not found"),
    (["defend", "--run", "no-such-run"], "no stored run"),
    (["attack", "--dataset", "digits", "--epochs", "abc"], "invalid float"),
    (["runs", "show"], "needs a run id"),
    (["attack", "--dataset", "digits", "--param", "size=abc"], "size must be a number, got 'abc'"),
    (["attack", "--dataset", "digits", "--attack", "blended", "--param", "alpha=[1,2]"], "alpha must be a number"),
    (["attack", "--dataset", "digits", "--param", "size=1e400"], "size must be a finite number"),
    (["attack", "--dataset", "digits", "--param", "size=2.5"], "size must be a whole number"),
    (["attack", "--dataset", "digits", "--param", "size=true"], "size must be a number"),
    (["attack", "--dataset", "digits", "--seed", "99999999999999999999999"], "seed must be from 0"),
    (["attack", "--dataset", "digits", "--epochs", "1e308"], "epochs must be above 0 and at most"),
    (["attack", "--dataset", "digits", "--param", 'pattern={"a":1}'], "a trigger image is a path to a PNG/JPEG"),
    (["attack", "--dataset", "digits", "--param", "pattern=[[1,2],[3]]"], "must be a regular array of numbers"),
    (["compare", "--run", "20261128-035156-attack-accf97", "--clean-fraction", "nan"], "clean fraction"),
])
def test_bad_input_one_line_no_trace(tmp_path, args, reason):
    r = cli("--runs-dir", str(tmp_path), *args, env={"BDFT_DATA_DIR": str(tmp_path), "BDFT_OFFLINE": "1"})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_unreadable_run_record(tmp_path):
    from bdft_core.runs import Run, RunStore
    from bdft_core.models import build_model

    store = RunStore(tmp_path)
    m = build_model("fastnet", 10, 1, widths=(8, 8, 8))
    run = Run(id="20260101-000000-attack-abc123", kind="attack", created=0.0, dataset="digits",
              model={"name": "fastnet", "num_classes": 10, "channels": 1, "kwargs": {"widths": [8, 8, 8]}},
              attack={"name": "badnets"}, config={}, seed=0, device="cpu")
    store.save(run, m)
    (store.path(run.id) / "model.safetensors").write_bytes(b"garbage")
    r = cli("--runs-dir", str(tmp_path), "defend", "--run", run.id)
    assert r.returncode == 2 and "not a valid safetensors" in r.stderr and "Traceback" not in r.stderr


def test_transfer_demo_json(tmp_path):
    r = cli("--runs-dir", str(tmp_path), "demo", "--dataset", "digits", "--paradigm", "transfer", "--epochs", "3",
            "--pparam", "head_epochs=1", "--pparam", "full_epochs=1", "--json")
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["paradigm"] == "transfer" and out["downstream"] == "digits"
    for key in ("attacker", "victim_head", "victim_full", "poisoned"):
        assert 0 <= out[key]["asr"] <= 1
    assert set(out["defended"]) == {"ft", "sft"} and out["run_id"] == out["victim_head"]["run_id"]


def test_bad_paradigm_arguments():
    for args, msg in ((["--paradigm", "federated"], "unknown paradigm"),
                      (["--paradigm", "transfer", "--pparam", "victim=both"], "victim must be"),
                      (["--downstream", "gtsrb"], "downstream")):
        r = cli("demo", "--dataset", "digits", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
