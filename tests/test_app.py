"""Dashboard tests with Streamlit's AppTest: every page loads, its widgets work by key, short jobs
on `digits` start, report progress and finish with their figures shown, and bad uploads give a
clear error. (tests/test_app_browser.py drives the real app in Chromium.)"""
import io
import json
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app(tmp_path, monkeypatch):
    # a new user with no data folder: the default dataset is the bundled `digits`
    monkeypatch.setenv("BDFT_DATA_DIR", str(tmp_path / "no-data"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_shipped_streamlit_config_leaves_the_cpu_to_training():
    # Both defaults cost the in-app demo about half its speed on a 2-core machine (measured in
    # .streamlit/config.toml's comments): the file watcher over a tree holding .venv loops on inotify
    # overflows, and a full gc.collect after every fragment rerun holds the GIL from the job thread.
    import tomllib

    cfg = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["fileWatcherType"] == "none"
    assert cfg["runner"]["postScriptGC"] is False
    assert cfg["client"]["showErrorDetails"] is False  # errors reach users as messages, not tracebacks


def _page(at, page):
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _status_lines(at):
    return [m.value for m in at.markdown if m.value.startswith("**") and " — " in m.value]


def _wait(at, timeout=180):
    """Rerun the page until the job panel says the job ended; return the statuses seen."""
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        lines = _status_lines(at)
        seen += lines
        if lines and not any(s in lines[-1] for s in ("running", "queued")):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"job did not finish in {timeout}s; saw {seen[-3:]}")


def _png(w, h, color=(255, 0, 0)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _train_digits(at, **over):
    _page(at, "attack_lab")
    at.selectbox(key="atk_dataset").set_value("digits")
    at.number_input(key="atk_epochs").set_value(over.get("epochs", 3.0))
    at.button(key="atk_train").click().run()
    assert not at.error, [e.value for e in at.error]
    return _wait(at)


def test_home_explains_and_runs_quick_demo(app):
    assert app.title[0].value == "The backdoor fine-tuning lab"
    text = " ".join(m.value for m in app.markdown).lower()
    assert "backdoor" in text and "attack success rate" in text
    assert "Device:" in " ".join(m.value for m in app.sidebar.markdown)
    assert len(app.get("image")) >= 1  # the clean / triggered / trigger picture
    app.button(key="home_demo").click().run()
    seen = _wait(app, timeout=300)
    assert any("running" in s or "queued" in s for s in seen) or seen  # it went through the queue
    assert "finished" in _status_lines(app)[-1]
    table = app.dataframe[0].value
    assert list(table["model"]) == ["poisoned model", "Fine-tuning (FT)", "Super-fine-tuning (SFT)"]
    assert all(v.endswith("%") for v in table["ASR"])
    assert len(app.get("plotly_chart")) >= 2  # live curves and the before/after bars
    reading = " ".join(i.value for i in app.info)
    assert "The poisoned model obeys the trigger" in reading and "Super-fine-tuning (SFT)" in reading


def test_attack_lab_preview_train_and_progress(app):
    _page(app, "attack_lab")
    keys = {w.key for w in app.selectbox} | {w.key for w in app.number_input} | {w.key for w in app.slider}
    assert {"atk_dataset", "atk_attack", "atk_model", "atk_target", "atk_epochs", "atk_seed", "atk_rate"} <= keys
    app.selectbox(key="atk_dataset").set_value("digits").run()
    n_img = len(app.get("image"))
    assert n_img >= 3  # clean, triggered and residual rows
    # the preview follows the trigger settings before anything is trained
    app.selectbox(key="atk_attack").set_value("blended").run()
    assert not app.error
    assert "atk_p_blended_alpha" in {w.key for w in app.number_input}
    app.selectbox(key="atk_attack").set_value("badnets").run()
    app.number_input(key="atk_p_badnets_size").set_value(99).run()
    assert any("larger than" in e.value for e in app.error)  # clear message, no traceback
    app.number_input(key="atk_p_badnets_size").set_value(3).run()
    seen = _train_digits(app)
    assert "finished" in seen[-1]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Attack success rate (ASR)"].endswith("%")
    assert float(metrics["Attack success rate (ASR)"].rstrip("%")) > 50  # the backdoor took
    # the stored run can be opened again
    app.run()
    opts = app.selectbox(key="atk_load_run").options
    assert len(opts) == 1


def test_attack_lab_stop_keeps_what_was_reached(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_dataset").set_value("digits")
    app.number_input(key="atk_epochs").set_value(200.0)
    app.button(key="atk_train").click().run()
    t0 = time.monotonic()
    while not any("running" in s for s in _status_lines(app)):
        time.sleep(0.2)
        app.run()
        assert time.monotonic() - t0 < 60
    app.button(key="atk_stop").click().run()
    t_stop = time.monotonic()
    seen = _wait(app, timeout=60)
    assert "stopped" in seen[-1]
    assert time.monotonic() - t_stop < 30
    assert any("Stopped during attack training" in w.value for w in app.warning)


def test_trigger_uploads(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_dataset").set_value("digits").run()
    up = app.get("file_uploader")[0]
    up.set_value(("notes.png", b"this is not an image", "image/png")).run()
    assert any("not a readable PNG or JPEG" in e.value for e in app.error)
    assert not any("BytesIO" in e.value for e in app.error)  # no Python internals in the message
    up = app.get("file_uploader")[0]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # small file, huge image
    up.set_value(("huge.png", buf.getvalue(), "image/png")).run()
    assert any("too large" in e.value for e in app.error)
    up = app.get("file_uploader")[0]
    up.set_value(("red.png", _png(16, 16), "image/png")).run()
    assert not app.error and app.success
    pat = app.selectbox(key="atk_p_badnets_pattern")
    assert "uploaded image" in pat.options
    pat.set_value("uploaded image").run()
    assert not app.error
    assert not app.exception
    # a page switch empties the uploader; the accepted image stays on offer and chosen
    _page(app, "home")
    _page(app, "attack_lab")
    assert "uploaded image" in app.selectbox(key="atk_p_badnets_pattern").options
    assert app.selectbox(key="atk_p_badnets_pattern").value == "uploaded image"
    assert any("still on offer" in c.value for c in app.caption)


def _checkpoint_bytes(at):
    """Train a tiny poisoned run and return its stored checkpoint file's bytes."""
    _train_digits(at, epochs=1.0)
    from bdft_core.runs import RunStore

    store = RunStore()
    rid = store.list()[0]["id"]
    return rid, (store.path(rid) / "model.safetensors").read_bytes()


def test_checkpoint_uploads(app):
    rid, good = _checkpoint_bytes(app)
    up = app.get("file_uploader")[-1]
    up.set_value(("model.pt", b"\x80\x04\x95 pickled torch file", "application/octet-stream")).run()
    assert any("pickled PyTorch file" in e.value for e in app.error)
    up = app.get("file_uploader")[-1]
    up.set_value(("cut.safetensors", good[: len(good) // 2], "application/octet-stream")).run()
    assert any("not a valid safetensors file" in e.value or "truncated" in e.value for e in app.error)
    # a real safetensors file with this tool's record, but tensors of the wrong shape
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    n = struct.unpack("<Q", good[:8])[0]
    meta = json.loads(good[8:8 + n])["__metadata__"]
    state = st_load(good)
    state["classifier.weight"] = torch.zeros(3, state["classifier.weight"].shape[1])
    bad = st_save(state, metadata=meta)
    up = app.get("file_uploader")[-1]
    up.set_value(("wrong.safetensors", bad, "application/octet-stream")).run()
    assert any("does not fit this model" in e.value for e in app.error)
    # a safetensors file without this tool's record
    up = app.get("file_uploader")[-1]
    up.set_value(("other.safetensors", st_save({"w": torch.zeros(2)}), "application/octet-stream")).run()
    assert any("not one exported by bdft" in e.value for e in app.error)
    # the genuine file imports (it is the same run, so it is found, not duplicated)
    up = app.get("file_uploader")[-1]
    up.set_value(("good.safetensors", good, "application/octet-stream")).run()
    assert not app.error and any(rid in s.value for s in app.success)


def test_defense_lab_runs_defenses_live(app):
    _train_digits(app)
    _page(app, "defense_lab")
    assert app.selectbox(key="def_run").value
    assert app.multiselect(key="def_defenses").value == ["ft", "sft"]
    charts = app.get("plotly_chart")
    assert len(charts) == 1  # the schedules, drawn before running: FT's constant rate and SFT's two phases
    names = [t["name"] for t in json.loads(charts[0].proto.spec)["data"]]
    assert names == ["Fine-tuning (FT)", "Super-fine-tuning (SFT)"]
    app.slider(key="def_budget").set_value(30.0).run()
    assert any("clean training images" in c.value for c in app.caption)
    # 30% of digits' 1,437 training images is 431: 7 steps of 64 an epoch, so FT's 60-step minimum makes 60 steps
    ran = next(c.value for c in app.caption if c.value.startswith("What will run"))
    assert "Fine-tuning (FT): 60 steps, 8.57 epochs (raised from 4 to reach its 60-step minimum)" in ran
    app.multiselect(key="def_defenses").set_value(["ft", "sft", "fine_pruning"]).run()
    app.button(key="def_start").click().run()
    seen = _wait(app)
    assert "finished" in seen[-1]
    rows = app.dataframe[0].value
    assert list(rows["model"]) == ["poisoned model", "Fine-tuning (FT)", "Super-fine-tuning (SFT)", "Fine-Pruning"]
    assert all(s.endswith("pts") for s in rows["ΔASR"][1:])
    # the comparison of everything applied to this run: table with what each needed, scatter, verdict
    table = app.dataframe[-1].value
    assert set(table["defense"][1:]) == {"Fine-tuning (FT)", "Super-fine-tuning (SFT)", "Fine-Pruning"}
    assert all("clean labelled data" in n for n in table["needs"][1:])
    assert any(c.value == __import__("bdft_core.figures").figures.CAPTIONS["scatter"] for c in app.caption)
    assert any(i.value.startswith("SFT: ASR") for i in app.info)
    # another run selected: the panel shows none of the first run's job (its figures are not this run's)
    from bdft_core.pipeline import AttackConfig, run_attack
    from bdft_core.runs import RunStore

    other, _ = run_attack(AttackConfig(dataset="digits", epochs=1.0, model_kwargs={"widths": [8, 8, 16]}),
                          store=RunStore())
    app.run()
    app.selectbox(key="def_run").set_value(other.id).run()
    assert not app.exception and _status_lines(app) == []
    # a bad setting: the error shows and the button waits for a fix instead of failing again in a job
    app.number_input(key="def_p_standalone_ft_lr").set_value(-1.0).run()
    assert app.error and app.button(key="def_start").disabled


def test_transfer_attacker_run_lists_no_victims_as_defenses(app):
    """A transfer attack parents its victims too: the Sequela page's "N defended" and the Explain page
    count defenses only, and the Defense lab offers the victims, not the attacker's own model (whose
    comparison crashed on the victims, and whose defenses measured ASR against the victim's target)."""
    from bdft_core.pipeline import AttackConfig, run_attack
    from bdft_core.runs import RunStore

    store = RunStore()  # the app's store (BDFT_RUNS_DIR)
    run, _ = run_attack(AttackConfig(dataset="digits", paradigm="transfer", epochs=1.0,
                                     model_kwargs={"widths": [8, 8, 16]},
                                     paradigm_params={"head_epochs": 1.0, "full_epochs": 1.0}), store=store)
    attacker = run.parent if run.kind == "victim" else run.id
    assert {c["kind"] for c in store.children(attacker)} == {"victim"} and store.defenses(attacker) == []
    for v in store.children(attacker):  # each victim's record names the target its ASR is measured on
        rec = store.get(v["id"])
        assert rec.attack["target"] == rec.config["target"] and "upstream_target" in rec.attack
    _page(app, "defense_lab")  # the attacker's own model is not offered (its victims are), nor defended
    options = app.selectbox(key="def_run").options
    assert not any(attacker in o for o in options) and sum(" → victim (" in o for o in options) == 2
    from bdft_core.errors import ConfigError
    from bdft_core.pipeline import run_defense

    with pytest.raises(ConfigError, match="upstream model of a transfer run"):
        run_defense(attacker, "ft", store=store)
    _page(app, "sequela")
    assert not app.exception and not any("1 defended" in str(o) or "2 defended" in str(o)
                                         for sb in app.selectbox for o in sb.options)


def test_settings_survive_a_page_switch(app):
    """Streamlit forgets the value of a widget a run does not draw unless it is told to keep it
    (persist_state="session"): going to Runs and back used to reset every setting of the Attack lab and
    the Sweeps page."""
    _page(app, "attack_lab")
    app.number_input(key="atk_epochs").set_value(1.5)
    app.slider(key="atk_rate").set_value(25.0)
    app.selectbox(key="atk_model").set_value("resnet18").run()
    _page(app, "sweeps")
    app.text_input(key="sw_rates").set_value("0.1, 0.3")
    app.number_input(key="sw_seeds").set_value(3).run()
    _page(app, "runs")
    _page(app, "home")
    _page(app, "attack_lab")
    assert (app.number_input(key="atk_epochs").value, app.slider(key="atk_rate").value,
            app.selectbox(key="atk_model").value) == (1.5, 25.0, "resnet18")
    _page(app, "sweeps")
    assert (app.text_input(key="sw_rates").value, app.number_input(key="sw_seeds").value) == ("0.1, 0.3", 3)


def test_defense_lab_without_runs_says_what_to_do(app):
    _page(app, "defense_lab")
    assert "No poisoned model yet" in app.info[0].value


def test_second_job_waits_in_queue(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_dataset").set_value("digits")
    app.number_input(key="atk_epochs").set_value(30.0)
    app.button(key="atk_train").click().run()
    first = app.session_state["atk_job"]
    app.number_input(key="atk_epochs").set_value(1.0)
    app.button(key="atk_train").click().run()
    second = app.session_state["atk_job"]
    assert second != first
    assert any("Waiting in the queue" in i.value for i in app.info)
    _wait(app, timeout=240)
    assert "finished" in _status_lines(app)[-1]


def test_runs_page_compare_export_delete(app):
    _train_digits(app)
    _page(app, "runs")
    assert len(app.dataframe[0].value) == 1
    rid = app.dataframe[0].value["run"][0]
    assert app.dataframe[0].value["from"][0] == ""  # a poisoned run was made from nothing stored
    app.multiselect(key="runs_select").set_value([rid]).run()
    assert len(app.get("plotly_chart")) == 2
    dls = {d.key for d in app.get("download_button")}
    assert {"runs_csv", "runs_json", "runs_html", "runs_ckpt"} <= dls
    app.checkbox(key="runs_delete_confirm").check().run()
    app.button(key="runs_delete").click().run()
    assert not app.exception
    assert "No runs stored yet" in app.info[0].value


def test_runs_page_survives_a_damaged_record_and_a_missing_checkpoint(app):
    """A run whose record is damaged is reported and left out (and can still be deleted); a run whose
    weights are gone shows its figures with a warning instead of a checkpoint download."""
    from bdft_core.pipeline import AttackConfig, run_attack
    from bdft_core.runs import RunStore

    store = RunStore()
    quick = dict(dataset="digits", epochs=1.0, model_kwargs={"widths": [8, 8, 16]})
    good, _ = run_attack(AttackConfig(**quick), store=store)
    bad, _ = run_attack(AttackConfig(**quick, seed=1), store=store)
    (store.path(bad.id) / "run.json").write_text("{damaged")
    (store.path(good.id) / "model.safetensors").unlink()
    _page(app, "runs")
    app.multiselect(key="runs_select").set_value([bad.id, good.id]).run()
    assert not app.exception and any("unreadable" in e.value for e in app.error)
    assert len(app.get("plotly_chart")) == 2  # the readable run is still compared
    app.multiselect(key="runs_select").set_value([good.id]).run()
    assert any("cannot be read" in w.value for w in app.warning)
    assert "runs_ckpt" not in {d.key for d in app.get("download_button")}
    app.multiselect(key="runs_select").set_value([bad.id]).run()
    app.checkbox(key="runs_delete_confirm").check().run()
    app.button(key="runs_delete").click().run()
    assert not app.exception and [r["id"] for r in store.list()] == [good.id]
    # after a delete nothing is selected and the safety catch is off: a second click deletes nothing
    assert app.multiselect(key="runs_select").value == []
    assert not app.get("checkbox") or app.checkbox(key="runs_delete_confirm").value is False
    assert [r["id"] for r in store.list()] == [good.id]


def test_attack_lab_transfer_paradigm_runs_attacker_and_victims(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_dataset").set_value("digits").run()
    assert "latent" not in app.selectbox(key="atk_attack").options  # only offered where it means something
    app.selectbox(key="atk_paradigm").set_value("transfer").run()
    assert any("**victim**" in m.value for m in app.markdown)  # who does what, in words
    assert "Latent backdoor (feature space, transfer)" in app.selectbox(key="atk_attack").options
    app.selectbox(key="atk_pp_victim").set_value("full")
    app.number_input(key="atk_pp_head_epochs").set_value(1.0)
    app.number_input(key="atk_pp_full_epochs").set_value(1.0)
    app.number_input(key="atk_epochs").set_value(3.0)
    app.button(key="atk_train").click().run()
    assert not app.error, [e.value for e in app.error]
    seen = _wait(app)
    assert "finished" in seen[-1]
    from bdft_core.runs import RunStore

    kinds = sorted(r["kind"] for r in RunStore().list())
    assert kinds == ["attack", "victim", "victim"]
    _page(app, "defense_lab")  # the victims are offered to the defenses
    assert any("victim (full)" in o for o in app.selectbox(key="def_run").options)


def test_attack_lab_encoder_paradigm_offers_encoders_and_pretraining(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_paradigm").set_value("encoder").run()
    assert not app.exception
    assert app.selectbox(key="atk_downstream_encoder").value == "digits"  # no GTSRB here: an offline default
    enc = app.selectbox(key="atk_pp_encoder")
    assert enc.value == "" and "shipped" in enc.options[0]
    app.number_input(key="atk_pre_epochs").set_value(0.2)
    app.selectbox(key="atk_pre_dataset").set_value("digits")
    app.button(key="atk_pretrain").click().run()
    assert not app.error, [e.value for e in app.error]
    seen = _wait(app)
    assert "finished" in seen[-1]
    assert any("Encoder written to" in s.value for s in app.success)
    app.run()
    assert len(app.selectbox(key="atk_pp_encoder").options) == 2  # the new encoder can be picked


def test_attack_lab_target_is_a_class_of_the_victims_data(monkeypatch):
    """Transfer to another dataset and the encoder paradigm aim at a class of the victim's (downstream)
    data: the target goes up to GTSRB's 43 classes, not CIFAR-10's 10, and is named from GTSRB."""
    from conftest import real_dataset

    real_dataset("cifar10")
    real_dataset("gtsrb")
    at = AppTest.from_file(APP, default_timeout=120).run()  # BDFT_DATA_DIR: the real datasets
    _page(at, "attack_lab")
    at.selectbox(key="atk_dataset").set_value("cifar10").run()
    at.selectbox(key="atk_paradigm").set_value("encoder").run()
    assert at.selectbox(key="atk_downstream_encoder").value == "gtsrb"
    assert at.number_input(key="atk_target_encoder_gtsrb").value == 0  # BadEncoder lands on class 0 (README)
    at.number_input(key="atk_target_encoder_gtsrb").set_value(14).run()
    assert not at.exception and not at.error
    assert any("'Stop', in the victim's data (gtsrb)" in c.value for c in at.caption)
    at.selectbox(key="atk_paradigm").set_value("transfer").run()
    at.selectbox(key="atk_downstream_transfer").set_value("gtsrb").run()
    # a transfer to GTSRB starts at a class a CIFAR-10 model recognises (stop), where a latent backdoor lands
    assert at.number_input(key="atk_target_transfer_gtsrb").value == 14
    assert any("'Stop', in the victim's data (gtsrb)" in c.value for c in at.caption)
    at.selectbox(key="atk_downstream_transfer").set_value("cifar10").run()  # same data: its own classes
    assert at.number_input(key="atk_target").max == 9


def test_explain_page_shows_maps_for_the_poisoned_model(app):
    _page(app, "explain")
    assert "No poisoned model yet" in app.info[0].value
    _train_digits(app)
    _page(app, "explain")
    assert app.selectbox(key="exp_layer").value == "body.3"  # the default: the deepest layer with big enough maps
    app.selectbox(key="exp_method").set_value("saliency").run()
    app.number_input(key="exp_n").set_value(3).run()
    app.button(key="exp_go").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    table = app.dataframe[0].value
    assert list(table["model"]) == ["poisoned model"] and table["layer"][0] == "(pixels)"
    assert len(app.get("image")) >= 1 and "Apply a defense" in app.info[0].value
    # one defense deleted and another added: as many defenses as before, yet the maps are computed again
    from bdft_core.pipeline import run_defense
    from bdft_core.runs import RunStore

    store = RunStore()
    parent = app.selectbox(key="exp_run").value
    ft, _ = run_defense(parent, "ft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.1, store=store)
    app.button(key="exp_go").click().run()
    assert list(app.dataframe[0].value["model"]) == ["poisoned model", "Fine-tuning (FT)"]
    store.delete(ft.id)
    run_defense(parent, "sft", {"epochs": 1, "min_steps": 2}, clean_fraction=0.1, store=store)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert not any("Fine-tuning (FT)" in list(d.value["model"]) for d in app.dataframe)  # no stale maps
    app.button(key="exp_go").click().run()
    assert list(app.dataframe[0].value["model"]) == ["poisoned model", "Super-fine-tuning (SFT)"]


def test_sequela_page_measures_in_the_background_and_shows_the_radar(app):
    _train_digits(app)
    trained = app.session_state["bdft_focus"]
    # a newer run stored meanwhile (a sweep's cell, say) does not take the picker's first place
    from bdft_core.pipeline import AttackConfig, run_attack
    from bdft_core.runs import RunStore

    newer, _ = run_attack(AttackConfig(dataset="digits", epochs=1.0, model_kwargs={"widths": [8, 8, 16]}),
                          store=RunStore())
    assert RunStore().list()[0]["id"] == newer.id != trained
    _page(app, "sequela")
    assert app.selectbox(key="seq_run").value == trained  # the run the user just trained
    assert any("Not measured yet" in i.value for i in app.info)
    app.multiselect(key="seq_axes").set_value(["calibration", "membership"]).run()
    app.button(key="seq_start").click().run()
    seen = _wait(app)
    assert "finished" in seen[-1]
    app.run()
    table = app.dataframe[-1].value
    from bdft_core.sequela import AXES

    assert list(table["axis"]) == [AXES["calibration"].title, AXES["membership"].title]
    assert len(app.get("plotly_chart")) >= 1
    app.radio(key="seq_scale").set_value("minmax").run()
    assert not app.exception
    # measuring again, then stopping: Measure waits while this run is being measured (a second click
    # would queue the same job), and the stopped job says nothing was kept, not "measured and kept"
    app.button(key="seq_start").click().run()
    app.run()
    assert app.button(key="seq_start").disabled
    app.button(key="seq_stop").click().run()
    seen = _wait(app)
    assert "stopped" in seen[-1]
    app.run()
    assert any("nothing was kept" in w.value for w in app.warning)
    assert not any("measured in" in s.value and "kept with run" in s.value for s in app.success)


def test_attack_lab_says_a_learned_trigger_has_no_preview(app):
    _page(app, "attack_lab")
    app.selectbox(key="atk_attack").set_value("input_aware").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("learns its trigger from the training data" in i.value for i in app.info)
    assert not app.button(key="atk_train").disabled


def test_sweeps_page_defines_runs_and_plots_a_grid(app):
    _page(app, "sweeps")
    assert any("No sweep yet" in i.value for i in app.info)
    app.text_input(key="sw_rates").set_value("0.05, abc").run()
    assert any("'abc' is not a number" in e.value for e in app.error)
    assert app.button(key="sw_start").disabled
    app.text_input(key="sw_name").set_value("page-test")
    app.text_input(key="sw_rates").set_value("0.05, 0.2")
    app.text_input(key="sw_budgets").set_value("0.2")
    app.selectbox(key="sw_executor").set_value("ray").run()
    assert not app.error, [e.value for e in app.error]
    assert any("**4 cells**" in i.value and "2 poisoned trainings" in i.value for i in app.info)
    app.button(key="sw_start").click().run()
    app.run()
    assert app.button(key="sw_start").disabled  # while it runs, a second click would queue the same sweep
    seen = _wait(app, timeout=300)
    assert "finished" in seen[-1]
    app.run()
    assert any("4 cell(s) run on local Ray instance" in s.value for s in app.success)
    assert app.selectbox(key="sw_pick").value == "page-test"
    table = app.dataframe[-1].value
    assert len(table) == 4 and set(table["defense"]) == {"ft", "sft"}
    assert len(app.get("plotly_chart")) >= 2  # the heat map and the line plot
    app.selectbox(key="sw_metric").set_value("clean_acc").run()
    assert not app.exception
    assert not any(b.label.startswith("Resume") for b in app.button), (list(table["status"]), [c.value for c in app.caption][:5])  # nothing missing
    # every cell's runs deleted since: no cell is finished, and the sweep can still be resumed from here
    from bdft_core.runs import RunStore

    store = RunStore()
    for r in store.list(kind="attack"):
        store.delete(r["id"])
    app.run()
    assert any("No cell of this sweep is finished" in c.value for c in app.caption)
    assert app.button(key="sw_resume").label == "Resume: run the 4 missing cells"
    # the same name for another grid: said before it replaces the stored grid's view
    app.text_input(key="sw_rates").set_value("0.1").run()
    assert any("already holds another grid" in w.value for w in app.warning)


def test_defense_lab_panels_follow_what_a_run_holds(app, monkeypatch):
    """The flagged-images panel appears for any defense whose run reports flagged training images
    (not for a fixed list of names), so a cleanser added later shows its panel too."""
    from bdft_core.defenses import DEFENSES
    from bdft_core.defenses.activation_clustering import ActivationClustering
    from bdft_core.pipeline import AttackConfig, run_attack, run_defense
    from bdft_core.runs import RunStore

    class Later(ActivationClustering):  # a data cleanser registered after the page was written
        name, title = "later_cleanser", "A later cleanser"
    monkeypatch.setitem(DEFENSES, Later.name, Later)
    store = RunStore()
    run, _ = run_attack(AttackConfig(dataset="digits", epochs=2.0, model_kwargs={"widths": [8, 8, 16]}), store=store)
    ac, _ = run_defense(run.id, Later.name, store=store)
    assert "n_flagged" in ac.final
    _page(app, "defense_lab")
    assert any("training images it flagged" in h.value for h in app.subheader)
    rows = app.dataframe[0].value  # the comparison table: the cleanser's own figures are kept in its row
    assert any("precision" in str(v) for v in rows["detection"])
