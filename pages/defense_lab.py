"""Defense lab: pick a poisoned run, one or more defenses and a clean-data budget; run and compare."""
import streamlit as st

import ui
from bdft_core import compare, figures
from bdft_core.defenses import DEFENSES, build_defense
from bdft_core.paradigms import DEFENSE_DEFAULTS, defense_defaults
from bdft_core.pipeline import DEFAULT_CLEAN_FRACTION, defender_size

st.title("Defense lab")
st.caption("Remove a backdoor: choose a poisoned model, the defenses to try and how much clean data the "
           "defender has, then compare how far each one lowers the attack success rate and what it costs.")

runs = [r for r in ui.store().list()  # a transfer attacker's own model is not defended: its victims are
        if r["kind"] == "victim" or (r["kind"] == "attack" and r.get("paradigm") != "transfer")]
if not runs:
    st.info("No poisoned model yet: train one in the Attack lab, or run the quick demo on the Home page.")
    st.stop()
ids = [r["id"] for r in runs]
labels = {r["id"]: f"{r['name']}{' → victim (' + str(r.get('victim')) + ')' if r['kind'] == 'victim' else ''}"
                   f" on {r['dataset']} · CA {figures.pct(r['clean_acc'])} · ASR {figures.pct(r['asr'])}"
                   f" · {r['id']}" for r in runs}
parent = st.selectbox("Poisoned run", ids, index=ui.run_choice(ids, "def_run"), key="def_run", persist_state="session",
                      format_func=labels.get,
                      help="The backdoored model to clean (newest first)")
ui.set_focus(parent)
chosen = st.multiselect("Defenses", list(DEFENSES), default=["ft", "sft"], key="def_defenses", persist_state="session",
                        format_func=lambda d: DEFENSES[d].title,
                        help="Each runs on its own copy of the poisoned model, one after the other")
budget = st.slider("Clean-data budget (% of the training set)", 0.5, 100.0, 100 * DEFAULT_CLEAN_FRACTION, 0.5,
                   key="def_budget", persist_state="session", help="How much clean, correctly labelled data the defender has")

params, schedules = {}, {}
try:
    run = ui.store().get(parent)  # read once per rerun; everything below uses it
except Exception as exc:
    ui.show_error(exc)
    st.stop()
paradigm = run.config.get("paradigm", "standalone")
for name in chosen:
    cls = DEFENSES[name]
    with st.expander(f"{cls.title} settings"):
        st.caption(f"{cls.paper}. Needs: {cls.needs}.")
        if cls.uses_poisoned_data and paradigm != "standalone":
            st.warning("This defense inspects the poisoned training set, which the victim never trained on in "
                       "this paradigm: it will be skipped.")
        if DEFENSE_DEFAULTS.get(paradigm, {}).get(name):
            st.caption(f"Defaults adjusted for the {paradigm} paradigm (see the README).")
        params[name] = ui.param_widgets(defense_defaults(paradigm, name), cls.help, f"def_p_{paradigm}_{name}")
valid = True  # settings that fail here would only fail again in the job: the button waits for a fix
try:
    n_clean = defender_size(run, budget / 100.0)
    st.caption(f"The defender gets {n_clean} clean training images.")
    runs_for = []
    for name in chosen:
        d = build_defense(name, **params[name])
        if d.has_schedule():
            schedules[name] = d.schedule_values(n_clean)
            epochs, asked = d.epochs_for(n_clean), float(d.params["epochs"])
            runs_for.append(f"{d.title}: {d.total_steps(n_clean)} steps, {epochs:.3g} epochs"
                            + (f" (raised from {asked:g} to reach its {d.params['min_steps']}-step minimum)"
                               if epochs > asked else ""))
    if runs_for:
        st.caption("What will run on this budget: " + "; ".join(runs_for) + ".")
    if schedules:
        st.plotly_chart(figures.schedule_figure(schedules), key="def_schedule")
        st.caption(figures.CAPTIONS["schedule"])
except Exception as exc:
    ui.show_error(exc)
    valid = False

if st.button("Run defenses", key="def_start", type="primary", disabled=not chosen or not valid,
             help="Apply each chosen defense to the poisoned model in the background"):
    try:
        ui.jobs().submit(
            "defend", title=f"{', '.join(d.upper() for d in chosen)} on {parent}", parent=parent, defenses=chosen,
            params=params, clean_fraction=budget / 100.0)
    except Exception as exc:
        ui.show_error(exc)

mine = ui.jobs().latest_for("defend", parent=parent)  # this run's newest defend job, not another run's
ui.job_panel(mine.id if mine else None, key="def")

newest = ui.store().newest_defenses(parent)  # the latest result per defense
if newest:
    st.subheader("How the defenses compare on this run")
    try:
        d_runs = {name: ui.store().get(rid) for name, rid in newest.items()}
    except Exception as exc:
        ui.show_error(exc)
        st.stop()
    rows = [compare.row_of(run, d) for d in d_runs.values()]
    before = {**run.final, "seconds": run.timings.get("total_s")}
    st.dataframe(figures.comparison_rows(before, rows), hide_index=True, key="def_table")
    st.caption("Newest result per defense. ΔASR below zero means the backdoor weakened; ΔCA near zero means "
               "clean accuracy was kept. 'needs' is what the defender must have for that defense.")
    st.plotly_chart(figures.cost_scatter(before, rows), key="def_scatter")
    st.caption(figures.CAPTIONS["scatter"])
    if "sft" in d_runs and len(rows) > 1:
        st.info(compare.verdict({"rows": rows, "poisoned": before}))
    for d_run in d_runs.values():  # panels follow what a run holds, so a defense added later gets them too
        if "anomaly_index" in d_run.final:  # a trigger reverse-engineered per class (Neural Cleanse)
            ui.reversed_trigger_panel(run, d_run)
        if "n_flagged" in d_run.final or "n_isolated" in d_run.final:  # training images flagged (cleansers, ABL)
            ui.flagged_panel(run, d_run)
