"""Sequela: what removing the backdoor did to the model's other weaknesses (membership inference,
re-injection, adversarial examples, stealing, calibration), as a radar and a table."""
import streamlit as st

import ui
from bdft_core import figures, sequela, sequela_runs

st.title("Backdoor sequela")
st.caption("Removing a backdoor changes a model in other ways too. Here each model is attacked in other ways "
           "(can an attacker tell which images it trained on? put the backdoor back? fool it with tiny changes? "
           "copy it?) and the results are compared. Outward on the radar means more vulnerable.")

runs = [r for r in ui.store().list() if r["kind"] in ("attack", "victim")]
if not runs:
    st.info("No poisoned model yet: train one in the Attack lab, or run the quick demo on the Home page.")
    st.stop()
labels = {r["id"]: f"{r['name']} on {r['dataset']} · {len(ui.store().newest_defenses(r['id'], stopped=False))} "
                   f"defense(s) to measure · {r['id']}" for r in runs}  # newest finished run per defense
run_id = st.selectbox("Poisoned run", list(labels), index=ui.run_choice(list(labels), "seq_run"), key="seq_run",
                      persist_state="session", format_func=labels.get,
                      help="The poisoned model and every defended version of it are measured together")
ui.set_focus(run_id)
axes = st.multiselect("Axes", sequela.axis_names(), default=sequela.axis_names(), key="seq_axes", persist_state="session",
                      format_func=lambda a: sequela.AXES[a].title,
                      help="Each axis is one other attack; all are measured on the same data and seed")
mine = ui.jobs().latest_for("sequela", run_id=run_id)  # this run's newest measurement, not another run's
busy = mine is not None and mine.active  # a second click would queue the same measurement again
if st.button("Measure", key="seq_start", type="primary", disabled=not axes or busy,
             help="Being measured: see below" if busy else "Runs in the background; takes a minute or a few on a CPU"):
    if not busy:
        try:
            mine = ui.jobs().get(ui.jobs().submit("sequela", title=f"sequela of {run_id}", run_id=run_id, axes=axes))
        except Exception as exc:
            ui.show_error(exc)
ui.job_panel(mine.id if mine else None, key="seq")

try:
    res = sequela_runs.stored_sequela(ui.store(), run_id)
except Exception as exc:
    ui.show_error(exc)
    st.stop()
if res is None:
    st.info("Not measured yet for this run: press Measure.")
    st.stop()
if res.get("deleted"):
    st.warning("Deleted since this measurement: " + ", ".join(figures.label_of(d) for d in res["deleted"])
               + ". Their columns below show models that no longer exist: press Measure again.")
elif res.get("stale"):
    st.warning("Defenses were applied or re-run after this measurement: press Measure again to include them.")
scale = st.radio("Radar scale", ["fixed", "minmax"], key="seq_scale", persist_state="session", horizontal=True,
                 format_func=lambda s: {"fixed": "fixed ranges (comparable across runs)",
                                        "minmax": "per axis, worst model at the edge"}[s])
st.plotly_chart(sequela.radar_figure({**res, "models": res["models"]}, scale=scale), key="seq_radar")
st.dataframe(sequela_runs.table_rows(res), hide_index=True, key="seq_table")
st.caption(f"Raw values; in brackets the change from the poisoned model. Measured in {res['total_seconds']:.0f} s "
           f"on {res['sizes']['members']} member and {res['sizes']['nonmembers']} non-member images (seed {res['seed']}).")
