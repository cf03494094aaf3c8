"""The transfer paradigm: who sees which data, and the flow attacker -> victim -> defense."""
import os

import numpy as np
import pytest
import torch

from bdft_core.errors import ConfigError
from bdft_core.jobs import JobManager
from bdft_core.paradigms.transfer import downstream_setting
from bdft_core.pipeline import AttackConfig, run_defense, run_demo, setting_for
from bdft_core.runs import RunStore

QUICK = {"head_epochs": 1.0, "full_epochs": 1.0}


def _other_npz(tmp_path, classes=5):
    """A second 8x8 grayscale dataset (same image shape as digits, another label space)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "other.npz"
    np.savez(path, x_train=rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8),
             y_train=np.arange(300) % classes, x_test=rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8),
             y_test=np.arange(100) % classes, classes=np.array([f"c{i}" for i in range(classes)]))
    return str(path)


def _as_set(t):
    return set(t.cpu().tolist())


def test_same_dataset_split_is_disjoint():
    cfg = AttackConfig(dataset="digits", paradigm="transfer", attack="latent", target=3,
                       paradigm_params={"victim_share": 0.6, "n_refs": 10})
    ds = downstream_setting(cfg)
    n = len(ds.setting.data.y_train)
    victim, attacker, refs = _as_set(ds.victim_idx), _as_set(ds.attacker_idx), _as_set(ds.refs_idx)
    assert not victim & attacker and victim | attacker == set(range(n))
    assert len(victim) == round(0.6 * n)
    assert refs <= attacker and len(refs) == 10  # the attacker's references come from its own share
    assert (ds.setting.data.y_train[ds.refs_idx] == 3).all()
    for f in (0.005, 0.3, 1.0):  # the defender's clean data is always the victim's own
        assert _as_set(ds.setting.defender_indices(f)) <= victim
    assert ds.setting.defender_indices(1.0).numel() == len(victim)


def test_other_dataset_keeps_references_away_from_victim_and_defender(tmp_path):
    other = _other_npz(tmp_path)
    cfg = AttackConfig(dataset="digits", paradigm="transfer", attack="latent", downstream=other, target=2,
                       paradigm_params={"n_refs": 7})
    ds = downstream_setting(cfg)
    assert not ds.same and ds.setting.data.num_classes == 5 and ds.upstream.num_classes == 10
    refs, victim = _as_set(ds.refs_idx), _as_set(ds.victim_idx)
    assert len(refs) == 7 and not refs & victim and refs | victim == set(range(300))
    assert (ds.setting.data.y_train[ds.refs_idx] == 2).all()
    assert not _as_set(ds.setting.defender_indices(1.0)) & refs
    assert len(ds.attacker_idx) == len(ds.upstream.y_train)  # the attacker's upstream data: all of it
    # ASR is measured on the downstream test set, target excluded
    assert (ds.setting.evaluator.y_bd == 2).all()
    assert len(ds.setting.evaluator.y_bd) == int((ds.setting.data.y_test != 2).sum())


def test_bad_transfer_settings(tmp_path):
    with pytest.raises(ConfigError, match="no setting"):
        AttackConfig(dataset="digits", paradigm="transfer", paradigm_params={"colour": 1}).validate()
    with pytest.raises(ConfigError, match="victim must be"):
        AttackConfig(dataset="digits", paradigm="transfer", paradigm_params={"victim": "all"}).validate()
    with pytest.raises(ConfigError, match="transfer paradigm"):
        AttackConfig(dataset="digits", attack="latent").validate()
    with pytest.raises(ConfigError, match="downstream"):
        AttackConfig(dataset="digits", downstream="digits").validate()
    big = tmp_path / "big.npz"
    z = np.zeros((20, 16, 16, 1), np.uint8)
    np.savez(big, x_train=z, y_train=np.arange(20) % 2, x_test=z, y_test=np.arange(20) % 2)
    with pytest.raises(ConfigError, match="same image size"):
        downstream_setting(AttackConfig(dataset="digits", paradigm="transfer", downstream=str(big)))


def test_latent_without_reference_images_is_refused_on_one_dataset_too(tmp_path):
    """Same dataset up- and downstream: when the attacker's share holds no image of the target class,
    the latent loss would average over nothing (NaN) and ruin the published model."""
    from bdft_core.paradigms.transfer import downstream_setting

    g = np.random.default_rng(0)
    y = np.array([i % 4 for i in range(99)] + [4])  # one image of class 4, the target
    path = tmp_path / "rare.npz"
    np.savez(path, x_train=g.integers(0, 255, (100, 8, 8, 1), dtype=np.uint8), y_train=y,
             x_test=g.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8), y_test=np.arange(20) % 5)
    cfg = AttackConfig(dataset=str(path), paradigm="transfer", attack="latent", target=4,
                       paradigm_params={"victim_share": 0.95, "n_refs": 5})
    with pytest.raises(ConfigError, match="no training images of target class 4"):
        downstream_setting(cfg)


def test_a_stop_during_the_attackers_training_keeps_the_attackers_model(tmp_path):
    import threading

    from bdft_core.pipeline import run_attack

    store, stop = RunStore(tmp_path / "runs"), threading.Event()
    cfg = AttackConfig(dataset="digits", paradigm="transfer", epochs=2.0, model_kwargs={"widths": [8, 8, 16]},
                       paradigm_params=QUICK)
    run, model = run_attack(cfg, store=store, stop=stop, callbacks=[("on_batch", lambda p: stop.set())])
    assert run.kind == "attack" and run.status == "stopped" and model is not None  # used to raise StopIteration
    assert [r["id"] for r in store.list()] == [run.id]


def test_a_trigger_image_file_is_kept_with_the_runs_in_the_transfer_paradigm(tmp_path):
    """As for standalone runs, the run records a copy in the runs folder, not the user's own file."""
    from PIL import Image

    from bdft_core.paradigms.transfer import downstream_setting
    from bdft_core.runs import runs_dir

    mine = tmp_path / "my_trigger.png"
    Image.new("RGB", (3, 3), (255, 0, 0)).save(mine)
    cfg = AttackConfig(dataset="digits", paradigm="transfer", attack="badnets", params={"pattern": str(mine)})
    downstream_setting(cfg)
    kept = cfg.params["pattern"]
    assert kept != str(mine) and str(runs_dir() / "triggers") in kept and open(kept, "rb").read()


def test_transfer_without_the_comparison_victim_trains_only_the_defended_one(tmp_path):
    store = RunStore(tmp_path / "runs")
    cfg = AttackConfig(dataset="digits", paradigm="transfer", downstream=_other_npz(tmp_path), target=1, epochs=1.0,
                       paradigm_params={**QUICK, "victim": "full", "compare_victim": False})
    stages = []
    out = run_demo(cfg, defenses=("ft",), clean_fraction=0.3, store=store, on_stage=stages.append)
    assert stages == ["attack", "victim_full", "ft"]
    assert "victim_head" not in out and out["poisoned"] == {k: out["victim_full"][k] for k in out["poisoned"]}
    (victim,) = store.list(kind="victim")
    assert victim["id"] == out["run_id"] and store.get(victim["id"]).config["victim"] == "full"
    # the dashboard's job lists the same stages for its progress display
    job_cfg = {"dataset": "digits", "paradigm": "transfer", "paradigm_params": {"compare_victim": False}}
    assert JobManager(store)._check("demo", {"config": job_cfg, "defenses": ["sft"]}) == ["attack", "victim_head", "sft"]
    job_cfg["paradigm_params"] = {}
    assert JobManager(store)._check("demo", {"config": job_cfg, "defenses": ["sft"]})[:3] == [
        "attack", "victim_head", "victim_full"]
    with pytest.raises(ConfigError, match="compare_victim must be true or false"):
        AttackConfig(dataset="digits", paradigm="transfer", paradigm_params={"compare_victim": "no"}).validate()


@pytest.mark.parametrize("attack", ["badnets", "latent"])
def test_transfer_flow_stores_attacker_victims_and_defenses(tmp_path, attack):
    store = RunStore(tmp_path / "runs")
    other = _other_npz(tmp_path)
    cfg = AttackConfig(dataset="digits", paradigm="transfer", attack=attack, downstream=other, target=1, epochs=3.0,
                       paradigm_params={**QUICK, "trigger_steps": 50} if attack == "latent" else QUICK)
    out = run_demo(cfg, clean_fraction=0.3, store=store)
    for k in ("attacker", "victim_head", "victim_full", "poisoned"):
        assert 0 <= out[k]["asr"] <= 1 and 0 <= out[k]["clean_acc"] <= 1
    assert set(out["defended"]) == {"ft", "sft"}
    attacker = store.get(out["attacker"]["run_id"])
    assert attacker.kind == "attack" and attacker.dataset == "digits"
    assert attacker.model["num_classes"] == (11 if attack == "latent" else 10)  # latent: the extra class
    if attack == "latent":  # the optimised trigger is kept with the runs, and the victims use it
        pattern = attacker.config["params"]["pattern"]
        assert pattern.endswith(".png") and "triggers" in pattern
        assert store.get(out["run_id"]).config["params"]["pattern"] == pattern
    kids = store.children(attacker.id)
    assert {k["kind"] for k in kids} == {"victim"} and len(kids) == 2
    victim = store.get(out["run_id"])
    assert victim.parent == attacker.id and victim.model["num_classes"] == 5 and victim.config["victim"] == "head"
    assert victim.attack["target"] == 1  # the victim's target, not the upstream one (latent: the extra class 10)
    with pytest.raises(ConfigError, match="upstream model of a transfer run"):  # defenses start from a victim
        setting_for(attacker)
    # the stored victim reopens with its downstream setting, and a defense from the store works
    s = setting_for(victim)
    assert s.data.num_classes == 5
    # the victim's recall of the target class: its predictions on the clean target-class test images
    xt = s.data.x_test[s.data.y_test == 1]  # on the device the setting picked (CUDA where there is one)
    _, vm = store.load_model(victim.id, device=xt.device)
    with torch.no_grad():
        want = (vm(xt.float() / 255).argmax(1) == 1).float().mean().item()
    assert out["victim_head"]["target_recall"] == pytest.approx(want, abs=1.5 / len(xt))  # bf16 may flip a tie
    assert victim.final["target_recall"] == out["victim_head"]["target_recall"] and out["target"] == 1
    d_run, _ = run_defense(victim.id, "ft", params={"epochs": 1.0}, clean_fraction=0.5, store=store)
    assert d_run.parent == victim.id and d_run.config["n_clean"] == round(0.5 * victim.config["n_victim"])
    assert store.delete(attacker.id)[-1] == attacker.id  # deleting the attacker takes the victims and defenses
    assert store.list() == []


def test_trigger_optimisation_moves_triggered_features_to_the_target():
    from bdft_core.attacks import build_attack
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model
    from bdft_core.paradigms.transfer import optimize_trigger

    torch.manual_seed(0)
    d = load_dataset("digits")
    m = build_model("fastnet", 10, 1, widths=[8, 16, 16])
    m.fit_data(d.x_train)
    atk = build_attack("latent", (1, 8, 8), 10, size=3)
    x, refs = d.x_train[:200], d.x_train[d.y_train == 7][:10]

    def dist(pattern):
        mask = atk.mask
        with torch.no_grad():
            fr = m.features(refs.float() / 255).mean(0, keepdim=True)
            ft = m.features(x.float() / 255 * (1 - mask) + pattern * mask)
            return (1 - torch.nn.functional.cosine_similarity(ft, fr, dim=1)).mean().item()

    before = dist(atk.pattern)
    patch = optimize_trigger(m, x, refs, atk, steps=60)
    assert patch.dtype == torch.uint8 and patch.shape == (1, 3, 3)
    r0, c0, s = atk.box
    opt = torch.zeros(1, 8, 8)
    opt[:, r0:r0 + s, c0:c0 + s] = patch.float() / 255
    assert dist(opt) < before
    assert all(p.requires_grad for n, p in m.named_parameters() if "body.0" not in n)  # flags restored


def test_head_only_victim_keeps_the_published_encoder(tmp_path):
    from bdft_core.paradigms.transfer import train_attacker, transfer_victim

    cfg = AttackConfig(dataset="digits", paradigm="transfer", epochs=1.0, paradigm_params=QUICK)
    ds = downstream_setting(cfg)
    a_run, a_model = train_attacker(cfg, ds)
    v_run, v_model = transfer_victim(cfg, ds, a_run, a_model, "head")
    for (k, v), (k2, v2) in zip(a_model.body.state_dict().items(), v_model.body.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k  # frozen body, frozen BatchNorm statistics
    f_run, f_model = transfer_victim(cfg, ds, a_run, a_model, "full")
    assert not torch.equal(a_model.body[2][0].weight, f_model.body[2][0].weight)


def test_latent_trigger_steps_record_the_whole_run_and_leave_the_callers_config(tmp_path):
    """With a clean teacher and an optimised trigger, the attacker's record keeps the epochs asked for
    (not what was left after the teacher), the teacher's share, and the optimised pattern; the caller's
    config still holds its own settings."""
    from bdft_core.paradigms.transfer import train_attacker

    cfg = AttackConfig(dataset="digits", paradigm="transfer", attack="latent", target=3, epochs=2.0,
                       paradigm_params={**QUICK, "n_refs": 10, "trigger_steps": 5, "teacher_share": 0.25})
    params_before = dict(cfg.params)
    ds = downstream_setting(cfg)
    a_run, _ = train_attacker(cfg, ds)
    assert cfg.params == params_before  # not rewritten behind the caller's back
    assert a_run.config["epochs"] == 2.0 and a_run.config["teacher_epochs"] == 0.5
    assert a_run.config["train"]["epochs"] == 1.5  # the poisoned training after the teacher
    assert a_run.config["teacher_steps"] > 0 and a_run.timings["teacher_s"] > 0
    pattern = a_run.config["params"]["pattern"]
    assert isinstance(pattern, str) and os.path.exists(pattern)  # the optimised trigger, kept as an image
    assert a_run.attack["params"]["pattern"] == pattern
    # the downstream test set is triggered with that optimised trigger too
    assert ds.setting.attack.config()["params"]["pattern"] == pattern


def _tiny_encoder(tmp_path):
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model
    from bdft_core.ssl import encoder_spec, save_encoder

    torch.manual_seed(0)
    m = build_model("fastnet", 10, 1, widths=[8, 16, 16], pool="avg")
    m.fit_data(load_dataset("digits").x_train)
    return str(save_encoder(m, tmp_path / "enc.safetensors", encoder_spec("fastnet", 10, 1, (8, 8),
                                                                          widths=[8, 16, 16], pool="avg")))


def test_encoder_paradigm_data_flow_and_runs(tmp_path):
    from bdft_core.paradigms.encoder import encoder_setting

    other = _other_npz(tmp_path)
    pp = {"encoder": _tiny_encoder(tmp_path), "shadow_size": 200, "n_refs": 5, "bad_epochs": 1.0,
          "probe_epochs": 3}
    cfg = AttackConfig(dataset="digits", paradigm="encoder", downstream=other, target=4, paradigm_params=pp)
    es = encoder_setting(cfg)
    refs, victim = _as_set(es.refs_idx), _as_set(es.victim_idx)
    assert len(refs) == 5 and not refs & victim and refs | victim == set(range(300))
    assert (es.setting.data.y_train[es.refs_idx] == 4).all()
    assert len(es.shadow) == 200 and es.shadow.shape[1:] == (1, 8, 8)  # upstream images, no labels used
    assert not _as_set(es.setting.defender_indices(1.0)) & refs
    store = RunStore(tmp_path / "runs")
    out = run_demo(cfg, clean_fraction=0.5, store=store)
    assert set(out["defended"]) == {"ft", "sft"}
    for k in ("clean_encoder", "poisoned"):
        assert 0 <= out[k]["clean_acc"] <= 1 and 0 <= out[k]["asr"] <= 1
    run = store.get(out["run_id"])
    assert run.kind == "attack" and run.model["num_classes"] == 5 and run.config["paradigm"] == "encoder"
    assert {c["name"] for c in store.children(run.id)} == {"ft", "sft"}
    d_run, _ = run_defense(run.id, "sft", clean_fraction=0.1, store=store)  # reopened from the store
    assert d_run.config["n_clean"] == round(0.1 * len(victim))


def test_missing_encoder_file_is_a_clear_error(tmp_path):
    from bdft_core.errors import CheckpointError

    cfg = AttackConfig(dataset="digits", paradigm="encoder", downstream=_other_npz(tmp_path),
                       paradigm_params={"encoder": str(tmp_path / "nope.safetensors")})
    with pytest.raises(CheckpointError, match="not found"):
        run_demo(cfg)


def test_defenses_keep_frozen_layers_frozen_and_use_paradigm_defaults(tmp_path):
    """A defense trains what the published model trains (fastnet's whitening stays fixed), and the
    encoder paradigm's defenses start from its own (smaller) learning rates."""
    from bdft_core.paradigms import defense_defaults
    from bdft_core.pipeline import run_attack

    run, model = run_attack(AttackConfig(dataset="digits", epochs=1.0))
    w0 = model.whiten.weight.detach().clone()
    _, cleaned = run_defense(run, "sft", model=model, params={"epochs": 1.0})
    assert torch.equal(cleaned.whiten.weight, w0)
    enc = defense_defaults("encoder", "sft")
    assert enc["max_lr1"] < defense_defaults("standalone", "sft")["max_lr1"] and enc["phase1"] == 0.4


def test_latent_loss_sees_triggered_and_reference_images_in_one_batch():
    """Features through a training-mode batch norm. The trigger turns every image into the reference
    image, so triggered and reference features are equal and the loss is exactly 0, but only when
    all images are normalised together: a batch of identical images alone normalises to zeros
    (cosine 0, loss 1), which is what separate passes did."""
    from bdft_core.paradigms.transfer import latent_loss

    class BNFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4, affine=False)

        def features(self, x):
            return self.bn(x.flatten(1))

    ref = torch.tensor([[[[0.9, 0.1], [0.4, 0.7]]]])

    class BecomesRef:
        def apply(self, x):
            return ref.expand(len(x), -1, -1, -1)

    x = torch.tensor([[[[0.0, 0.2], [0.5, 1.0]]], [[[0.3, 0.3], [0.8, 0.1]]]])
    m = BNFeatures().train()
    assert latent_loss(m, x, BecomesRef(), ref.repeat(3, 1, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    # by hand, the separate-pass version: the triggered batch alone normalises to zeros
    assert torch.count_nonzero(m.features(BecomesRef().apply(x))) == 0


def test_suggested_target_is_a_recognised_class_only_for_a_measured_transfer():
    from bdft_core.paradigms import suggested_target

    assert suggested_target("transfer", "cifar10", "gtsrb")[0] == 14
    assert "stop" in suggested_target("transfer", "CIFAR10", "GTSRB")[1]
    # same dataset, no downstream, other paradigms and unmeasured pairs start at class 0 with no reason given
    for args in (("transfer", "cifar10", "cifar10"), ("transfer", "cifar10", None), ("encoder", "cifar10", "gtsrb"),
                 ("standalone", "cifar10", None), ("transfer", "gtsrb", "cifar10")):
        assert suggested_target(*args) == (0, "")


@pytest.mark.parametrize("paradigm", ["standalone", "transfer"])
def test_a_demo_says_stopped_exactly_when_a_stage_was_cut_short(tmp_path, paradigm):
    """``stopped`` follows the runs: a Stop during FT (SFT then never runs) is a stopped demo, a
    Stop that lands after the last defense's last step (during its final evaluation) stops nothing."""
    import threading

    extra = {"paradigm_params": QUICK} if paradigm == "transfer" else {}
    cfg = dict(dataset="digits", paradigm=paradigm, epochs=1.0, model_kwargs={"widths": [8, 8, 16]}, **extra)

    def demo(when, defenses=("ft", "sft")):
        stop, stage = threading.Event(), ["?"]

        def cb(p):
            if when(stage[0], p):
                stop.set()
        store = RunStore(tmp_path / f"runs{len(list(tmp_path.iterdir()))}")
        out = run_demo(AttackConfig(**cfg), defenses, clean_fraction=0.3, store=store, stop=stop,
                       on_stage=lambda s: stage.__setitem__(0, s), callbacks=[("on_batch", cb), ("on_epoch_end", cb)])
        return out, {r["id"]: r["status"] for r in store.list()}

    out, status = demo(lambda stage, p: stage == "ft" and p.step >= 1)
    assert out["stopped"] and out["defended"]["ft"]["stopped"] and "sft" not in out["defended"]
    assert status[out["defended"]["ft"]["run_id"]] == "stopped"
    out, status = demo(lambda stage, p: stage == "ft" and p.step == p.total_steps, defenses=("ft",))
    assert not out["stopped"] and not out["defended"]["ft"]["stopped"]
    assert set(status.values()) == {"finished"}


def test_a_config_checks_its_settings_types_before_the_paradigm_reads_them():
    for bad, msg in (({"paradigm": "transfer", "paradigm_params": "x"}, "paradigm_params must be a table"),
                     ({"paradigm": ["transfer"]}, "paradigm must be text")):
        with pytest.raises(ConfigError, match=msg):
            AttackConfig(dataset="digits", **bad).validate()
