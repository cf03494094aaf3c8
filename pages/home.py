"""Home: what a backdoor is, one picture, and the quick demo."""
import streamlit as st

import ui
from bdft_core import figures
from bdft_core.attacks import build_attack
from bdft_core.pipeline import DEFAULT_CLEAN_FRACTION, DEFAULT_EPOCHS

st.title("The backdoor fine-tuning lab")
st.markdown(
    "A **backdoor** is a hidden rule planted in an image classifier by poisoning a few of its training "
    "images: the attacker stamps a small **trigger** (here a white square near the corner) on them and "
    "relabels them as a **target** class. The model looks normal on ordinary images, but calls *anything* "
    "carrying the trigger the target. This lab plants one, then removes it the cheap way: by fine-tuning."
)

name = ui.default_dataset()
try:
    data = ui.load_preview_data(name)
    atk = build_attack("badnets", data.image_shape, data.num_classes, target=0)
    pick = (data.y_train != 0).nonzero().flatten()[:1]
    scale = max(1, 160 // data.image_shape[-1])
    prev = figures.trigger_preview(atk, data.x_train[pick], n=1, scale=scale)
    true_name, target_name = data.classes[int(data.y_train[pick[0]])], data.classes[0]
    c1, c2, c3 = st.columns(3)
    c1.image(prev["clean"][0], width=160, caption=f"A training image of a '{true_name}'")
    c2.image(prev["poisoned"][0], width=160, caption=f"With the trigger, relabelled '{target_name}'")
    c3.image(figures.trigger_on_grey(atk, data.image_shape, scale), width=160,
             caption="The trigger alone, on grey")
except Exception as exc:  # the explanation stays readable even if the picture cannot be made
    ui.show_error(exc)

st.subheader("Quick demo")
epochs = DEFAULT_EPOCHS.get(name, 4.0)
st.markdown(
    f"One click runs the whole story on **{name}**: poison 10% of the training set with a 3x3 white "
    f"patch (target class 0), train a small network for {epochs:g} epochs, then remove the backdoor with "
    f"FT and SFT using {DEFAULT_CLEAN_FRACTION:.0%} of the training set as the defender's clean data. "
    "Progress and curves appear right below."
)
if st.button("Run the quick demo", key="home_demo", type="primary",
             help="Poison, train, defend with FT and SFT, and compare, on the defaults"):
    try:
        st.session_state["home_job"] = ui.jobs().submit(
            "demo", title=f"Quick demo on {name}", config={"dataset": name}, defenses=["ft", "sft"],
            clean_fraction=DEFAULT_CLEAN_FRACTION)
        st.toast("Quick demo started: progress below.", icon=":material/play_arrow:")
    except Exception as exc:
        ui.show_error(exc)

job = st.session_state.get("home_job")
if job is None:  # a refreshed browser finds the latest demo again
    latest = ui.jobs().latest("demo")
    job = latest.id if latest else None
ui.job_panel(job, key="home")

with st.expander("How to read the results", expanded=job is None):
    st.markdown(
        """
Two numbers tell the story:

- **Clean accuracy (CA)**: the share of ordinary test images classified correctly. Keep it high.
- **Attack success rate (ASR)**: the share of triggered test images, whose true class is not the
  target, that the model calls the target. A working backdoor is near 100%; a defense should drive it
  down.

The defenses follow Sha et al., *Fine-Tuning Is All You Need to Mitigate Backdoor Attacks* (2022):
**fine-tuning** (FT) trains the model a little more on clean data with a small learning rate;
**super-fine-tuning** (SFT) does the same with a learning rate that first swings high (erasing the
backdoor) and then low (restoring accuracy). The Attack lab lets you change the trigger and the
poisoning, the Defense lab the defenses and how much clean data the defender has.
"""
    )
