"""Attack lab: choose a setting, preview the trigger, train a poisoned model, or load one."""
import streamlit as st

import ui
from bdft_core import figures
from bdft_core.attacks import ATTACKS, build_attack
from bdft_core.data import dataset_names
from bdft_core.models import MODELS
from bdft_core.paradigms import DEFAULTS as PDEFAULTS
from bdft_core.paradigms import HELP as PHELP
from bdft_core.paradigms import ROLES, suggested_target
from bdft_core.pipeline import DEFAULT_EPOCHS, PARADIGMS
from bdft_core.ssl import encoders_dir, list_encoders
from bdft_core.uploads import MAX_TRIGGER_BYTES

st.title("Attack lab")
st.caption("Plant a backdoor: pick the data, the trigger and how much of the training set to poison, "
           "check the trigger in the preview, then train.")

avail = ui.available_datasets()
names = sorted(set(dataset_names()) | set(avail), key=lambda n: (n not in avail, n))
left, right = st.columns([1, 1])
with left:
    ds = st.selectbox("Dataset", names, index=names.index(ui.default_dataset()), key="atk_dataset", persist_state="session",
                      format_func=lambda n: n if n in avail else f"{n} (download on first use)",
                      help="Images to poison and train on; 'digits' is small and always offline")
    paradigm = st.selectbox("Paradigm", PARADIGMS, key="atk_paradigm", persist_state="session",
                            help="Who trains what: standalone (the victim trains on poisoned data) or transfer "
                                 "(the victim builds on a backdoored pretrained model)")
    with st.expander(f"Who does what in the {paradigm} paradigm", expanded=paradigm != "standalone"):
        st.markdown("\n".join(f"- **{role}**: {text}" for role, text in ROLES[paradigm].items()))
    downstream, pparams = None, {}
    if paradigm != "standalone":
        first = "gtsrb" if paradigm == "encoder" and "gtsrb" in avail else ds
        downstream = st.selectbox("Downstream dataset (the victim's)", names, index=names.index(first),
                                  key=f"atk_downstream_{paradigm}", persist_state="session", help="The victim's own labelled data. Transfer: "
                                  "the same dataset uses a disjoint split; another one (same image size) a new label "
                                  "space. Encoder: the probe's dataset")
        encs = list_encoders()
        with st.expander(f"{paradigm.capitalize()} settings"):
            pparams = ui.param_widgets(PDEFAULTS[paradigm], PHELP, "atk_pp",
                                       {"victim": ("head", "full"), **({"encoder": tuple(encs)} if encs else {})},
                                       labels={"encoder": encs})
        if paradigm == "encoder":
            if pparams.get("encoder") in encs:
                st.caption(f"Clean encoder: {encs[pparams['encoder']]}")
            with st.expander("Pretrain a new clean encoder (SimCLR; slow on a CPU, minutes on a GPU)"):
                pre_ds = st.selectbox("Unlabeled images", names, index=names.index(ds), key="atk_pre_dataset", persist_state="session",
                                      help="The encoder learns from these images' training split, without labels")
                pre_ep = st.number_input("Epochs", 0.1, 500.0, 10.0, key="atk_pre_epochs", persist_state="session",
                                         help="SimCLR passes over the images; the shipped encoder used 8 (31 min on "
                                              "a 2-core CPU)")
                if st.button("Pretrain", key="atk_pretrain", help="Runs in the background; the new encoder then "
                                                                  "appears in the encoder settings"):
                    import time as _t

                    out = str(encoders_dir() / f"{pre_ds}-{_t.strftime('%Y%m%d-%H%M%S')}.safetensors")
                    try:
                        st.session_state["atk_job"] = ui.jobs().submit(
                            "pretrain", title=f"Pretrain an encoder on {pre_ds}", dataset=pre_ds,
                            epochs=float(pre_ep), out=out, probe_datasets=[pre_ds])
                    except Exception as exc:
                        ui.show_error(exc)
    offered = [a for a in ATTACKS if paradigm != "standalone" or not getattr(ATTACKS[a], "latent", False)]
    attack = st.selectbox("Attack", offered, key="atk_attack", persist_state="session", format_func=lambda a: ATTACKS[a].title,
                          help="How the trigger looks and is applied")
    cls = ATTACKS[attack]
    st.caption(f"Paper: {cls.paper}")
    upload = None
    if cls.image_param:
        upload = st.file_uploader("Your own trigger image (PNG or JPEG, optional)", type=["png", "jpg", "jpeg"],
                                  max_upload_size=MAX_TRIGGER_BYTES // 1024 ** 2,  # the widget states it, in MB
                                  key="atk_trigger_upload",
                                  help=f"Used as {cls.title}'s trigger image (its '{cls.image_param}' setting)")
    # an accepted upload is kept for the session: the uploader itself is empty again after a page switch
    trigger_path = st.session_state.get("atk_trigger_path")
    if upload is not None:
        try:
            from bdft_core.uploads import save_trigger_image

            trigger_path = str(save_trigger_image(upload.getvalue(), upload.name))
            st.session_state["atk_trigger_path"] = trigger_path
            st.session_state["atk_trigger_name"] = upload.name
            st.success("Trigger image accepted: choose 'uploaded image' below to use it.")
        except Exception as exc:
            ui.show_error(exc)
    elif trigger_path and cls.image_param:
        st.caption(f"Your uploaded trigger ({st.session_state.get('atk_trigger_name', 'image')}) is still on "
                   "offer as 'uploaded image' below.")
    choices = {k: tuple(v) + (("uploaded image",) if k == cls.image_param and trigger_path else ())
               for k, v in cls.choices.items()}
    with st.expander("Trigger settings", expanded=True):
        params = ui.param_widgets(cls.defaults, cls.help, f"atk_p_{attack}", choices)
    if cls.image_param and params.get(cls.image_param) == "uploaded image":
        params[cls.image_param] = trigger_path
with right:
    rate = st.slider("Poison rate (% of the training set)", 0.0, 100.0, 10.0, 0.5, key="atk_rate", persist_state="session",
                     help="Share of training images that carry the trigger; 0 trains a clean model")
    mode = st.radio("Target", ["all_to_one", "all_to_all"], key="atk_mode", persist_state="session", horizontal=True,
                    format_func=lambda m: {"all_to_one": "all to one class", "all_to_all": "each class to the next"}[m],
                    help="All-to-one: every triggered image becomes the target class; all-to-all: label + 1")
    aims_downstream = downstream is not None and (downstream != ds or paradigm == "encoder")
    try:
        data = ui.load_preview_data(ds)
        tdata = ui.load_preview_data(downstream) if aims_downstream else data  # the target's label space
    except Exception as exc:
        ui.show_error(exc)
        st.stop()
    first_target, why = suggested_target(paradigm, ds, downstream)
    target = st.number_input("Target label", 0, tdata.num_classes - 1, first_target,
                             key=f"atk_target_{paradigm}_{downstream}" if aims_downstream else "atk_target", persist_state="session",
                             help="The class the backdoor sends triggered images to (all-to-one)"
                                  + ("; here a class of the victim's data. A feature-space backdoor only lands on a "
                                     "class the victim's model recognises" if aims_downstream else "")
                                  + (f". Starts at {first_target}, {why}" if why else ""))
    st.caption(f"Target class: '{tdata.classes[int(target)]}'"
               + (f", in the victim's data ({downstream})" if aims_downstream else ""))
    model = st.selectbox("Model", list(MODELS), key="atk_model", persist_state="session", format_func=lambda m: f"{m}: {MODELS[m][1]}",
                         help="fastnet trains in about a minute on a CPU; resnet18 is the literature's standard")
    epochs = st.number_input("Epochs", 0.1, 200.0, float(DEFAULT_EPOCHS.get(data.name, 4.0)), 0.5, key="atk_epochs", persist_state="session",
                             help="Passes over the training set")
    seed = st.number_input("Seed", 0, 2 ** 31 - 1, 0, key="atk_seed", persist_state="session", help="Same seed, same run")
    n_train = st.number_input("Training images (0 = all)", 0, len(data.y_train), 0, step=500, key="atk_ntrain", persist_state="session",
                              help=f"Use a seeded slice of the {len(data.y_train)} training images for a quicker run")

st.subheader("Preview")
try:
    atk = build_attack(attack, data.image_shape, tdata.num_classes, target=int(target), mode=mode, seed=int(seed),
                       **params)
    if atk.preview_needs_fit:
        st.info(f"{atk.title} learns its trigger from the training data when training starts (about a minute), "
                "so there is no trigger to preview before training.")
        prev = {}
    else:
        prev = figures.trigger_preview(atk, data.x_train, n=6)
    for row, label in (("clean", "clean"), ("poisoned", "with trigger"), ("residual", "trigger (amplified)")):
        if row in prev:
            st.image(prev[row], caption=[label] * len(prev[row]))
    if prev:
        st.caption(figures.CAPTIONS["preview"])
except Exception as exc:
    ui.show_error(exc)
    atk = None

config = {"dataset": ds, "attack": attack, "params": params, "poison_rate": rate / 100.0, "target": int(target),
          "mode": mode, "paradigm": paradigm, "model": model, "epochs": float(epochs), "seed": int(seed),
          "n_train": int(n_train) or None,
          "downstream": downstream if aims_downstream else None,
          "paradigm_params": pparams}
if st.button("Train", key="atk_train", type="primary", disabled=atk is None,
             help="Poison the training set and train the model in the background"):
    try:
        st.session_state["atk_job"] = ui.jobs().submit(
            "attack", title=f"{cls.title} on {ds}, {rate:g}% poisoned", config=config)
    except Exception as exc:
        ui.show_error(exc)

job = st.session_state.get("atk_job")
if job is None:
    latest = ui.jobs().latest(("attack", "pretrain"))
    job = latest.id if latest else None
ui.job_panel(job, key="atk")

st.subheader("Load a poisoned model")
runs = ui.store().list(kind="attack")
c1, c2 = st.columns(2)
with c1:
    opts = [r["id"] for r in runs]
    sel = st.selectbox("Stored run", opts, index=None, key="atk_load_run", persist_state="session", placeholder="choose a stored run",
                       format_func=lambda i: next(f"{r['name']} on {r['dataset']} · CA {figures.pct(r['clean_acc'])} · "
                                                  f"ASR {figures.pct(r['asr'])} · {i}" for r in runs if r["id"] == i),
                       help="Every poisoned model trained here (see also the Runs page)")
    if sel:
        try:
            run = ui.store().get(sel)
            st.plotly_chart(figures.curves_figure({"attack": figures.run_series(run)}), key="atk_loaded_curves")
            st.caption(figures.CAPTIONS["curves"])
            st.caption(f"Run `{run.id}`: CA {figures.pct(run.final.get('clean_acc'))}, "
                       f"ASR {figures.pct(run.final.get('asr'))}. Defend it in the Defense lab.")
        except Exception as exc:
            ui.show_error(exc)
with c2:
    ck = st.file_uploader("Or upload a checkpoint (.safetensors exported by this tool)", type=["safetensors", "pt", "pth", "bin"],
                          key="atk_ckpt_upload", help="Pickled .pt/.pth files are refused: they can run code")
    if ck is not None:
        try:
            from bdft_core.uploads import import_checkpoint

            run = import_checkpoint(ck.getvalue(), ui.store(), filename=ck.name)
            st.success(f"Imported as run {run.id} ({run.kind}, {run.dataset}): CA "
                       f"{figures.pct(run.final.get('clean_acc'))}, ASR {figures.pct(run.final.get('asr'))}")
        except Exception as exc:
            ui.show_error(exc)
