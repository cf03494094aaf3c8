"""Grad-CAM on the real default run (CIFAR-10, BadNets): on triggered images the poisoned model puts
at least twice as much of its attribution mass on the trigger patch as the SFT-cleaned model
(measured: 6.3% against 0.7% on 256 images; bench/readme_figures.py)."""
from bdft_core.explain import explain_models
from bdft_core.explain_runs import pick_images
from bdft_core.pipeline import prepare, attack_config_of


def test_gradcam_attention_leaves_the_trigger_after_sft(cifar_demo, cifar_badnets):
    run, model = cifar_badnets
    out, store = cifar_demo
    sft_run, sft = store.load_model(out["defended"]["sft"]["run_id"])  # the demo's SFT of this model
    assert sft_run.parent == run.id
    s = prepare(attack_config_of(run))
    assert sft_run.final["asr"] < 0.2
    idx = pick_images(s.data.y_test, s.attack, 128, seed=0)
    res = explain_models({"poisoned": model, "sft": sft}, s.data.x_test.cpu()[idx], s.attack, method="gradcam")
    p, d = res["models"]["poisoned"]["mean"], res["models"]["sft"]["mean"]
    assert res["models"]["poisoned"]["layer"] == "body.3"  # the default: 8x8 maps for a 3x3 patch
    assert p["share_triggered"] >= 2 * d["share_triggered"]
    assert p["share_triggered"] > 3 * p["share_clean"]  # the trigger draws the poisoned model's attention
    assert p["flip_rate"] > 0.8 and d["flip_rate"] < 0.3
