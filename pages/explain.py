"""Explain: where does each model look? Attribution maps of a poisoned model and its defended
versions on the same test images, clean and with the trigger."""
import streamlit as st

import ui
from bdft_core import explain, explain_runs, figures

st.title("Explain")
st.caption("Where does the model look when it decides? Bright areas mattered most for the prediction. A backdoored "
           "model looks at the trigger when it is there; after a successful defense its attention should leave it.")

runs = [r for r in ui.store().list() if r["kind"] in ("attack", "victim")]
if not runs:
    st.info("No poisoned model yet: train one in the Attack lab, or run the quick demo on the Home page.")
    st.stop()
labels = {r["id"]: f"{r['name']} on {r['dataset']} · ASR {figures.pct(r['asr'])} · {r['id']}" for r in runs}
run_id = st.selectbox("Poisoned run", list(labels), index=ui.run_choice(list(labels), "exp_run"), key="exp_run",
                      persist_state="session", format_func=labels.get,
                      help="Its defended versions (from the Defense lab) are shown next to it")
ui.set_focus(run_id)
c1, c2, c3 = st.columns(3)
method = c1.selectbox("Method", explain.method_names(), key="exp_method", persist_state="session",
                      format_func=lambda m: explain.METHODS[m].title,
                      help="Grad-CAM: coarse, from a convolutional layer; Saliency: pixel gradients; Integrated "
                           "Gradients: sharper, about 100x slower")
n = c2.number_input("Test images", 1, 16, 6, key="exp_n", persist_state="session", help="Test images whose true class is not the target")
seed = c3.number_input("Seed", 0, 10_000, 0, key="exp_seed", persist_state="session", help="Which test images are drawn")
layer = None
if explain.METHODS[method].uses_layer:
    try:
        names, layers, default = ui.layer_choices(run_id)
        layer = st.selectbox("Grad-CAM layer", names, index=names.index(default), key="exp_layer", persist_state="session",
                             format_func=lambda nm: layers[names.index(nm)],
                             help="Deeper layers are more about meaning, shallower ones localise better; the default "
                                  "is the deepest whose maps are at least a quarter of the image's side (8x8 on 32x32 "
                                  "images, 2x2 on 8x8 digits)")
    except Exception as exc:
        ui.show_error(exc)
        st.stop()

# the defenses by run id: one deleted and another added since must not show the old maps
key = (run_id, method, int(n), int(seed), layer, tuple(sorted(r["id"] for r in ui.store().defenses(run_id))))
if st.button("Compute maps", key="exp_go", type="primary") or st.session_state.get("exp_key") == key:
    try:
        with st.spinner("Computing attribution maps…"):
            if st.session_state.get("exp_key") != key:
                st.session_state["exp_res"] = explain_runs.explain_run(ui.store(), run_id, n=int(n), method=method,
                                                                       layer=layer, seed=int(seed))
                st.session_state["exp_key"] = key
        res = st.session_state["exp_res"]
    except Exception as exc:
        ui.show_error(exc)
        st.stop()
    st.dataframe(figures.explain_rows(res), hide_index=True, key="exp_table")
    st.caption(figures.CAPTIONS["explain"])
    cols = st.columns(len(res["models"]))
    for col, name in zip(cols, res["models"]):
        col.markdown(f"**{figures.label_of('poisoned' if name == 'poisoned' else name)}**")
        col.image(explain_runs.panel(res, name, scale=3), caption="top: clean · bottom: with trigger")
    st.info(figures.explain_sentence(res))
