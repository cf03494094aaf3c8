"""Uploaded files (trigger images, checkpoints), exports and figure builders."""
import csv
import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from bdft_core import figures, report
from bdft_core.errors import CheckpointError, ConfigError
from bdft_core.models import build_model
from bdft_core.runs import Run, RunStore, new_run_id
from bdft_core.uploads import import_checkpoint, safetensors_header, save_trigger_image


def _png(w, h, mode="RGB", color=0, fmt="PNG"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def test_trigger_image_is_checked_and_stored_by_content(tmp_path):
    p = save_trigger_image(_png(7, 5, color=(255, 0, 0)), "red.png", root=tmp_path)
    assert p.parent == tmp_path and p.suffix == ".png"
    assert save_trigger_image(_png(7, 5, color=(255, 0, 0)), "again.png", root=tmp_path) == p
    with Image.open(p) as im:
        assert im.size == (7, 5) and im.getpixel((0, 0)) == (255, 0, 0)
    jpg = save_trigger_image(_png(8, 8, color=(0, 0, 255), fmt="JPEG"), "b.jpg", root=tmp_path)
    assert jpg != p


@pytest.mark.parametrize("data,msg", [
    (b"", "empty"),
    (b"GIF89a not really", "not a readable"),
    (_png(4, 4, fmt="GIF"), "must be PNG or JPEG"),
    (_png(5000, 4000, mode="1"), "too large"),
])
def test_bad_trigger_images(tmp_path, data, msg):
    with pytest.raises(ConfigError, match=msg):
        save_trigger_image(data, "x", root=tmp_path)


def test_uploaded_trigger_drives_the_attack(tmp_path):
    from bdft_core.attacks import build_attack

    p = save_trigger_image(_png(3, 3, color=(255, 0, 0)), "red.png", root=tmp_path)
    atk = build_attack("badnets", (3, 8, 8), 10, size=3, pattern=str(p), position="top_left", margin=0)
    out = atk.apply(torch.zeros(1, 3, 8, 8))
    assert torch.equal(out[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert out[0, :, 3:, 3:].abs().sum() == 0


def _stored_run(tmp_path, num_classes=10):
    store = RunStore(tmp_path / "runs")
    model = build_model("fastnet", num_classes, 1)
    run = Run(id=new_run_id("attack"), kind="attack", created=1.0, dataset="digits",
              model={"name": "fastnet", "num_classes": num_classes, "channels": 1, "image_size": [8, 8], "kwargs": {}},
              attack={"name": "badnets", "poison_rate": 0.1}, config={"dataset": "digits"}, seed=0, device="cpu",
              history=[{"step": 1, "epoch": 0.5, "clean_acc": 0.5, "asr": 0.9}], final={"clean_acc": 0.8, "asr": 0.95},
              timings={"total_s": 2.0})
    store.save(run, model)
    return store, run, (store.path(run.id) / "model.safetensors").read_bytes()


def test_checkpoint_round_trip_into_another_store(tmp_path):
    store, run, data = _stored_run(tmp_path)
    other = RunStore(tmp_path / "other")
    got = import_checkpoint(data, other, "x.safetensors")
    assert got.id == run.id and other.get(run.id).final == run.final
    _, model = other.load_model(run.id)
    assert model.classifier.out_features == 10
    assert import_checkpoint(data, other).id == run.id  # the same file twice is not duplicated
    assert len(other.list()) == 1


def test_checkpoint_refusals(tmp_path):
    store, run, data = _stored_run(tmp_path)
    with pytest.raises(CheckpointError, match="pickled PyTorch"):
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(1)}, buf)
        import_checkpoint(buf.getvalue(), store)
    with pytest.raises(CheckpointError, match="truncated|not a valid"):
        import_checkpoint(data[: len(data) // 2], store)
    with pytest.raises(CheckpointError, match="not one exported by bdft"):
        import_checkpoint(st_save({"w": torch.zeros(2)}), store)
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n])["__metadata__"]
    rec = json.loads(meta["run"])
    rec["model"]["num_classes"] = 43  # the record says 43 classes, the weights have 10
    meta["run"] = json.dumps(rec)
    from safetensors.torch import load as st_load

    with pytest.raises(CheckpointError, match="does not fit this model"):
        import_checkpoint(st_save(st_load(data), metadata=meta), store)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        safetensors_header(struct.pack("<Q", 10 ** 9) + b"{}")


def test_exports(tmp_path):
    store, run, _ = _stored_run(tmp_path)
    rows = list(csv.DictReader(io.StringIO(report.runs_csv([run]))))
    assert rows[0]["id"] == run.id and float(rows[0]["asr"]) == 0.95
    hist = list(csv.DictReader(io.StringIO(report.history_csv([run]))))
    assert len(hist) == 1 and float(hist[0]["clean_acc"]) == 0.5
    assert json.loads(report.runs_json([run]))["runs"][0]["id"] == run.id
    page = report.html_report([run], title="t<1>")
    assert page.startswith("<!doctype html>") and "t&lt;1&gt;" in page and "95.0%" in page
    assert "Plotly.newPlot" in page and "src=\"http" not in page  # plotly.js inlined: opens offline


def test_figure_helpers():
    assert figures.pct(0.9567) == "95.7%" and figures.pct(None) == "–"
    assert [figures.duration(s) for s in (0.2, 40, 210, 7200, None)] == ["1 s", "40 s", "3.5 min", "2.0 h", "unknown"]
    assert figures.count(1, "cell") == "1 cell" and figures.count(4, "cell") == "4 cells"
    assert "did not learn the task" in figures.training_warning(0.122, 0.0, 10, 0.1)  # chance is 10%
    assert "did not take" in figures.training_warning(0.9, 0.3, 10, 0.1)
    assert figures.training_warning(0.9, 0.3, 10, 0.0) == ""  # a clean model is meant to have no backdoor
    assert figures.training_warning(0.9, 0.97, 10, 0.1) == "" and figures.training_warning(None, None, None) == ""
    assert figures.color_of("attack") == figures.color_of("poisoned") == figures.ATTACK_COLOR
    assert figures.color_of("ft") != figures.color_of("sft") != figures.ATTACK_COLOR
    assert figures.color_of("some_future_defense") == figures.color_of("some_future_defense")
    from bdft_core.defenses import DEFENSES

    colours = [figures.color_of(n) for n in DEFENSES]  # every defense its own colour, none the poisoned model's
    reds = {figures.ATTACK_COLOR, figures.color_of("victim_head"), figures.color_of("victim_full")}
    assert len(set(colours)) == len(colours) and not set(colours) & reds
    # ten more defenses registered later: the existing ones keep their colours, every one still its own
    import bdft_core.defenses as dmod

    more = {**DEFENSES, **{f"later_{i}": DEFENSES["ft"] for i in range(10)}}
    orig = dmod.DEFENSES
    dmod.DEFENSES = more
    try:
        grown = [figures.color_of(n) for n in more]
    finally:
        dmod.DEFENSES = orig
    assert grown[:len(colours)] == colours and len(set(grown)) == len(grown) and not set(grown) & reds
    assert all(len(c) == 7 and c.startswith("#") for c in grown)  # hex: the sweep figures' bands parse it
    assert figures.color_of("badnets") == figures.ATTACK_COLOR  # an attack's name is the poisoned model
    rows = figures.summary_rows({"clean_acc": 0.8, "asr": 0.9, "seconds": 3}, {"sft": {"clean_acc": 0.78, "asr": 0.05,
                                                                                       "seconds": 1.5}})
    assert rows[1]["ΔASR"] == "-85.0 pts" and rows[1]["ΔCA"] == "-2.0 pts" and rows[1]["ASR"] == "5.0%"
    fig = figures.curves_figure({"attack": [{"epoch": 1, "asr": 0.5, "clean_acc": 0.6}],
                                 "sft": [{"epoch": 0, "asr": 0.4, "clean_acc": 0.6}]})
    assert len(fig.data) == 4 and fig.data[0].y == (50.0,)
    assert fig.data[0].line.color == figures.ATTACK_COLOR and fig.data[2].line.color == figures.color_of("sft")
    sched = figures.schedule_figure({"sft": [0.1, 0.2]})
    assert list(sched.data[0].y) == [0.1, 0.2]


def test_before_after_bars_of_stored_runs_keep_roles_and_runs_apart():
    from bdft_core.runs import Run

    def run(i, kind, name, parent=None, victim=None):
        return Run(id=f"20260101-00000{i}-{kind}-abc12{i}", kind=kind, created=float(i), dataset="digits", model={},
                   attack={"name": "badnets"}, config={"victim": victim} if victim else {}, seed=0, device="cpu",
                   parent=parent, defense={"name": name} if kind == "defense" else None,
                   final={"clean_acc": 0.9, "asr": 0.5})

    runs = [run(1, "attack", None), run(2, "attack", None), run(3, "victim", None, victim="full"),
            run(4, "defense", "ft", parent="a"), run(5, "defense", "ft", parent="b")]
    fig = figures.before_after_figure(figures.run_bar_rows(runs))
    names = [b.name for b in fig.data]
    assert len(set(names)) == 5 and names[0].endswith("abc121") and names[3].startswith("Fine-tuning (FT)")
    assert names[2].startswith("victim: whole model trained")
    colours = [b.marker.color for b in fig.data]
    assert colours[0] == colours[1] == figures.ATTACK_COLOR and colours[2] == figures.color_of("victim_full")
    assert colours[3] == colours[4] == figures.color_of("ft")
    page = report.html_report(runs)
    assert "victim: whole model trained" in page
    # curves: poisoned models' trainings on the first row, defenses (their own epochs) on the second
    curves = figures.compare_figure(runs)
    axes = {t.legendgroup: t.xaxis for t in curves.data if t.showlegend}
    assert [axes[r.id] for r in runs] == ["x", "x", "x", "x3", "x3"]
    legend = {t.legendgroup: t for t in curves.data if t.showlegend}
    assert legend[runs[3].id].name == names[3] == "Fine-tuning (FT) · abc124 (of a)"  # curves and bars agree
    assert legend[runs[3].id].line.dash is None and legend[runs[4].id].line.dash == "dash"  # two FT runs apart
    assert [t.xaxis for t in figures.compare_figure(runs[:2]).data] == ["x", "x2", "x", "x2"]  # one row


def test_explain_sentence_without_attention_on_the_trigger():
    res = {"rows": [{"model": "poisoned", "share_triggered": 0.0}, {"model": "ft", "share_triggered": 0.0}]}
    text = figures.explain_sentence(res)
    assert "inf" not in text and "no attention on the trigger to remove" in text
    res["rows"][0]["share_triggered"] = 0.4
    assert "down to nothing" in figures.explain_sentence(res)
    # a 3x3 patch is 14% of an 8x8 image: a 15.5% share is what an even spread gives, not attention
    res = {"region_area": 9 / 64, "rows": [{"model": "poisoned", "share_triggered": 0.155},
                                           {"model": "sft", "share_triggered": 0.072}]}
    text = figures.explain_sentence(res)
    assert "about what an even spread" in text and "left the trigger" not in text
    res["rows"][0]["share_triggered"] = 0.07  # half of an even spread: "less than", not "about"
    assert "less than what an even spread over the image gives (14.1%" in figures.explain_sentence(res)
    res["rows"][0]["share_triggered"] = 0.6
    assert "left the trigger" in figures.explain_sentence(res)


def test_preview_images():
    from bdft_core.attacks import build_attack

    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    atk = build_attack("badnets", (3, 8, 8), 10, size=2, position="top_left", margin=0)
    prev = figures.trigger_preview(atk, x, n=2, scale=2)
    assert prev["clean"][0].shape == (16, 16, 3) and prev["clean"][0].dtype == np.uint8
    assert prev["poisoned"][0][0, 0].tolist() == [255, 255, 255] and prev["poisoned"][0][5, 5].tolist() == [0, 0, 0]
    # residual: mid-grey where nothing changed, white where the patch added +1
    assert prev["residual"][0][5, 5].tolist() == [128, 128, 128] and prev["residual"][0][0, 0].tolist() == [255] * 3


def test_trigger_file_is_kept_with_the_runs(tmp_path, monkeypatch):
    from bdft_core.pipeline import AttackConfig, prepare
    from bdft_core.runs import runs_dir

    src = tmp_path / "mine.png"
    src.write_bytes(_png(3, 3, color=(0, 255, 0)))
    cfg = AttackConfig(dataset="digits", params={"pattern": str(src)})
    s = prepare(cfg)
    kept = cfg.params["pattern"]
    assert kept != str(src) and kept.startswith(str(runs_dir() / "triggers"))
    src.unlink()  # the original may disappear; the run still has its trigger
    assert prepare(AttackConfig(dataset="digits", params={"pattern": kept})).attack.config() == s.attack.config()


def test_plain_words_reading_and_paradigm_rows():
    text = figures.conclusion({"clean_acc": 0.8, "asr": 0.97}, {"ft": {"clean_acc": 0.79, "asr": 0.9},
                                                                "sft": {"clean_acc": 0.78, "asr": 0.04}})
    assert "obeys the trigger on 97%" in text
    assert "Super-fine-tuning (SFT) removed the backdoor: ASR 97% → 4.0% (clean accuracy -2.0 points)" in text
    assert "Fine-tuning (FT) left the backdoor in place (90.0% ASR)" in text
    assert "weak here" in figures.conclusion({"clean_acc": 0.3, "asr": 0.01}, {})
    assert "constant learning rate" not in text.split("Fine-tuning (FT) left")[0]  # FT's reason, for FT only
    sft_failed = figures.conclusion({"clean_acc": 0.8, "asr": 0.97}, {"sft": {"clean_acc": 0.8, "asr": 0.93}})
    assert "(SFT) left the backdoor in place (93.0% ASR)" in sft_failed and "constant" not in sft_failed
    weak = figures.conclusion({"clean_acc": 0.95, "asr": 0.08}, {"ft": {"clean_acc": 0.95, "asr": 0.09}})
    assert "removed" not in weak and "After Fine-tuning (FT): ASR 8% → 9.0%" in weak  # nothing to remove
    rows = figures.paradigm_rows({"paradigm": "transfer", "dataset": "cifar10", "downstream": "gtsrb",
                                  "attacker": {"clean_acc": 0.7, "asr": 0.9}, "victim_head": {"clean_acc": 0.5,
                                                                                              "asr": 0.02}})
    assert [r["ASR"] for r in rows] == ["90.0%", "2.0%"] and "gtsrb" in rows[1]["model"]
    assert figures.paradigm_rows({"paradigm": "standalone"}) == []
    res = {"paradigm": "transfer", "target": 0, "attacker": {"clean_acc": 0.7, "asr": 0.9},
           "victim_head": {"clean_acc": 0.3, "asr": 0.002, "target_recall": 0.0}}
    assert figures.paradigm_rows(res)[1]["target class recognised"] == "0.0%"
    assert "recognises only 0.0% of clean test images of target class 0" in figures.transfer_reading(res)
    res["victim_head"]["target_recall"] = 0.58
    assert "recognises 58.0% of clean target-class images" in figures.transfer_reading(res)
    res["victim_head"]["asr"] = 0.91  # the backdoor reached the victim: nothing to explain
    assert figures.transfer_reading(res) == "" and figures.transfer_reading({"paradigm": "encoder"}) == ""


def _with_record(data, edit=None, tensors=None):
    """``data``'s checkpoint with its run record changed by ``edit`` (and other tensors if given)."""
    from safetensors.torch import load as st_load

    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n])["__metadata__"]
    rec = json.loads(meta["run"])
    if edit:
        edit(rec)
    meta["run"] = json.dumps(rec)
    return st_save(st_load(data) if tensors is None else tensors, metadata=meta)


def _raw(header):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h


def test_checkpoint_record_is_checked_before_any_model_is_built(tmp_path, monkeypatch):
    import resource

    import bdft_core.models

    store, run, data = _stored_run(tmp_path)
    real = bdft_core.models.build_model

    def guarded(name, num_classes, channels=3, **kw):
        big = num_classes > 1000 or channels > 3 or kw.get("width", 0) > 256 or max(kw.get("widths", [0])) > 256
        assert not big or torch.get_default_device().type == "meta", "a huge model was built for real"
        return real(name, num_classes, channels, **kw)

    monkeypatch.setattr(bdft_core.models, "build_model", guarded)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tiny = {"w": torch.zeros(1)}
    for edit, msg in [
        (lambda r: r["model"].update(num_classes=3_000_000), "3000000 classes"),
        (lambda r: r["model"].update(channels=100_000), "100000 image channels"),
        (lambda r: r["model"].update(name="resnet18", kwargs={"width": 10 ** 6}), "model width 1000000"),
        (lambda r: r["model"]["kwargs"].update(widths=[10 ** 6] * 3), "widths .* out of range"),
        (lambda r: r["model"]["kwargs"].update(widths=[8] * 1000), "widths .* out of range"),
    ]:
        f = _with_record(data, edit, tiny)
        assert len(f) < 8000
        with pytest.raises(CheckpointError, match=msg):
            import_checkpoint(f, store)
    # within the bounds, yet far more than the file holds: refused from the header's shapes alone
    f = _with_record(data, lambda r: r["model"].update(num_classes=100_000, kwargs={"widths": [4096] * 3}), tiny)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        import_checkpoint(f, store)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB on Linux


def test_genuine_exports_of_other_shapes_still_import(tmp_path):
    for name, kwargs in [("fastnet", {"widths": [8, 16], "pool": "avg"}), ("resnet18", {"width": 4})]:
        store = RunStore(tmp_path / name)
        model = build_model(name, 3, 3, **kwargs)
        run = Run(id=new_run_id("attack"), kind="attack", created=1.0, dataset="cifar10",
                  model={"name": name, "num_classes": 3, "channels": 3, "image_size": [8, 8], "kwargs": kwargs},
                  attack={"name": "badnets"}, config={}, seed=0, device="cpu")
        store.save(run, model)
        data = (store.path(run.id) / "model.safetensors").read_bytes()
        assert import_checkpoint(data, RunStore(tmp_path / f"{name}-copy")).id == run.id


def test_malformed_checkpoint_headers_raise_checkpoint_errors(tmp_path):
    store, run, data = _stored_run(tmp_path)
    with pytest.raises(CheckpointError, match="header is not JSON"):
        import_checkpoint(_raw(b"[" * 100_000), store)
    with pytest.raises(CheckpointError, match="header is not JSON"):
        import_checkpoint(_raw(b'{"a": ' + b"1" * 5000 + b"}"), store)
    with pytest.raises(CheckpointError, match="__metadata__ is not a map of strings"):
        import_checkpoint(_raw({"__metadata__": 5}), store)
    with pytest.raises(CheckpointError, match="__metadata__ is not a map of strings"):
        import_checkpoint(_raw({"__metadata__": {"run": {"id": 1}}}), store)
    with pytest.raises(CheckpointError, match="record is damaged \\(not JSON"):
        import_checkpoint(_raw({"__metadata__": {"run": "[" * 100_000}}), store)
    with pytest.raises(CheckpointError, match="record is damaged \\(not a JSON object"):
        import_checkpoint(_raw({"__metadata__": {"run": "[1, 2]"}}), store)
    with pytest.raises(CheckpointError, match="'id' is a int, not a str"):
        import_checkpoint(_with_record(data, lambda r: r.update(id=123)), store)
    with pytest.raises(CheckpointError, match="'model' is a list"):
        import_checkpoint(_with_record(data, lambda r: r.update(model=[1])), store)
    with pytest.raises(CheckpointError, match="no seed"):
        import_checkpoint(_with_record(data, lambda r: r.pop("seed")), store)
    for bad in ["..", "../../etc", run.id + "/x"]:
        with pytest.raises(CheckpointError, match="the file's run id .* is invalid"):
            import_checkpoint(_with_record(data, lambda r: r.update(id=bad)), store)
    with pytest.raises(CheckpointError, match="invalid kind"):
        import_checkpoint(_with_record(data, lambda r: r.update(kind="../x")), store)
    meta = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    with pytest.raises(CheckpointError, match="malformed header entry"):
        import_checkpoint(_raw({"__metadata__": meta, "w": {"shape": "x"}}), store)
    assert [r["id"] for r in store.list()] == [run.id]  # nothing was stored


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    store, run, data = _stored_run(tmp_path)
    for pad in range(256):  # some padding of the record gives a header length of 0x..80
        f = _with_record(data, lambda r: r["config"].update(pad="x" * pad))
        if f[:1] == b"\x80":
            break
    assert f[:1] == b"\x80"
    assert import_checkpoint(f, RunStore(tmp_path / "other")).id == run.id


def test_16_bit_trigger_images_are_scaled_not_clipped(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), 30000, dtype=np.uint16)).save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode.startswith("I")
    p = save_trigger_image(buf.getvalue(), "grey16.png", root=tmp_path)
    with Image.open(p) as im:
        assert im.size == (5, 4) and im.getpixel((0, 0)) == (117, 117, 117)
