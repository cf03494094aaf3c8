"""Sweeps: a grid of experiments (poison rate x clean-data budget x defense x ...), every cell a
stored run; heat maps and line plots of the results as they arrive; CSV and HTML exports."""
import datetime
import json
import os

import streamlit as st

import ui
from bdft_core import figures
from bdft_core.attacks import ATTACKS
from bdft_core.defenses import DEFENSES
from bdft_core.pipeline import PARADIGMS
from bdft_core.sweeps import (NONE, SweepRecords, SweepSpec, estimate, grid_from_choices, list_sweeps, load_spec,
                              parse_values, ray_available, sweep_rows)
from bdft_core.sweeps import figures as sf

st.title("What-if sweeps")
st.caption("Ask how a result changes with the settings, for example how the attack success rate after "
           "super-fine-tuning depends on the poison rate and on how much clean data the defender has. Every "
           "combination of the values below is one experiment (a cell): a poisoned model trained and a defense "
           "applied, each stored as an ordinary run. Cells run in parallel through Ray and fill in live; a "
           "stopped or crashed sweep resumes with only its missing cells.")

store = ui.store()
sweeps = {s["name"]: s for s in list_sweeps(store)}  # read once per rerun
with st.expander("Define a grid", expanded=not sweeps or "sw_job" not in st.session_state):
    c1, c2 = st.columns(2)
    name = c1.text_input("Sweep name", value=f"sweep-{datetime.date.today():%Y%m%d}", key="sw_name", persist_state="session",
                         help="Results are kept under this name; running the same name again resumes it")
    avail = sorted(ui.available_datasets())
    dataset = c2.selectbox("Dataset", avail, index=avail.index("digits") if "digits" in avail else 0, key="sw_dataset", persist_state="session",
                           help="digits: seconds per cell on a laptop; CIFAR-10: about a minute or two per cell "
                                "on a CPU (use 'training images' below to take a slice)")
    attacks = c1.multiselect("Attacks", list(ATTACKS), default=["badnets"], key="sw_attacks", persist_state="session",
                             format_func=lambda a: ATTACKS[a].title)
    paradigms = c2.multiselect("Paradigms", list(PARADIGMS), default=["standalone"], key="sw_paradigms", persist_state="session")
    rates = c1.text_input("Poison rates", "0.05, 0.2", key="sw_rates", persist_state="session", help="Shares of the training set poisoned, "
                          "separated by commas")
    budgets = c2.text_input("Clean-data budgets", "0.05, 0.2", key="sw_budgets", persist_state="session",
                            help="The defender's clean data as a fraction of the training set (0.005 to 1)")
    defenses = c1.multiselect("Defenses", [NONE] + list(DEFENSES), default=["ft", "sft"], key="sw_defenses", persist_state="session",
                              format_func=lambda d: "no defense (the poisoned model)" if d == NONE else DEFENSES[d].title)
    seeds = int(c2.number_input("Seeds", 1, 20, 1, key="sw_seeds", persist_state="session",
                                help="Repeat every cell with seeds 0, 1, ...; the plots show their spread"))
    first = ATTACKS[attacks[0]] if attacks else None
    numeric = [k for k, v in (first.defaults.items() if first else []) if isinstance(v, (int, float))
               and not isinstance(v, bool)]
    t_param = c1.selectbox("Trigger setting to vary", ["(none)"] + numeric, key="sw_tparam", persist_state="session",
                           help=f"A setting of {first.title if first else 'the attack'}")
    t_vals = c2.text_input("Its values", "", key="sw_tvals", persist_state="session", disabled=t_param == "(none)",
                           help="Separated by commas, e.g. 2, 3, 4")
    lrs = c1.text_input("Fine-tuning learning rates (optional)", "", key="sw_lrs", persist_state="session",
                        help="The 'lr' setting of FT and other single-rate defenses; SFT keeps its schedule. "
                             "Several rates need single-rate defenses only. Empty keeps the defaults")
    epochs = c2.number_input("Attack training epochs (0: the dataset's default)", 0.0, 200.0, 0.0, key="sw_epochs", persist_state="session")
    n_train = int(c1.number_input("Training images (0: all)", 0, 1_000_000, 0, step=1000, key="sw_ntrain", persist_state="session",
                                  help="Train on a seeded slice: faster cells on large datasets"))
    threads = int(c2.number_input("CPU threads per cell", 1, 64, 1, key="sw_threads", persist_state="session",
                                  help="Cells run side by side, each with this many threads (one GPU each on "
                                       "GPU machines)"))
    address = c1.text_input("Ray cluster address (optional)", os.environ.get("RAY_ADDRESS", ""), key="sw_address", persist_state="session",
                            help="Empty: a local Ray instance on this machine. e.g. ray://head-node:10001")
    executor = c2.selectbox("Run with", ["auto", "ray", "process"], key="sw_executor", persist_state="session",
                            format_func={"auto": "Ray if installed, else local processes", "ray": "Ray",
                                         "process": "local process pool (no Ray)"}.get)
    if not ray_available():
        st.caption("Ray is not installed here: cells run on a local process pool (`pip install ray` for Ray).")
    grid, spec = None, None
    try:
        grid = grid_from_choices(
            name, dataset, attacks, parse_values(rates, "poison rates"), defenses,
            parse_values(budgets, "clean-data budgets"), seeds=seeds, paradigms=paradigms,
            trigger=(t_param, parse_values(t_vals, t_param, int if isinstance(first.defaults.get(t_param), int)
                                           else float)) if t_param != "(none)" else None,
            defense_lrs=parse_values(lrs, "learning rates"), epochs=epochs or None, n_train=n_train or None,
            threads_per_cell=threads)
        spec = SweepSpec.from_dict(grid)
        est = estimate(spec, store, address=address or None)
        done = f", {est['done']} already done" if est["done"] else ""
        when = (f"Estimated time: about **{figures.duration(est['seconds'])}** (from {est['basis']}; starting the "
                "workers adds a few seconds)." if est["seconds"] > 0 else "Nothing is left to run.")
        st.info(f"**{est['cells']} cells**{done}: {figures.count(est['trainings_to_run'], 'poisoned training')} and "
                f"{figures.count(est['defenses_to_run'], 'defense')} to run, {est['parallel']} at a time. {when}",
                icon=":material/grid_on:")
        held = SweepRecords(store, spec.name).spec() if spec.name in sweeps else None
        if held is not None and held != spec.to_dict():
            st.warning(f"A sweep named **{spec.name}** already holds another grid ({sweeps[spec.name]['done']} "
                       "finished cells). Starting this one shows this grid under that name: cells the two share are "
                       "reused, the others stay stored as runs but leave its tables and plots. Choose another name "
                       "to keep both.", icon=":material/warning:")
    except Exception as exc:
        ui.show_error(exc)
    b1, b2 = st.columns([1, 3])
    busy = spec is not None and any(j.kind == "sweep" and j.active and j.params["spec"].get("name") == spec.name
                                    for j in ui.jobs().list())  # a second click would queue the same sweep
    if b1.button("Start sweep", key="sw_start", type="primary", disabled=spec is None or busy,
                 help=f"Sweep {spec.name} is running: see below" if busy else None):
        try:
            st.session_state["sw_job"] = ui.jobs().submit("sweep", title=f"sweep {spec.name}", spec=grid,
                                                          executor=executor, address=address or None)
            st.session_state["sw_pick"] = spec.name
        except Exception as exc:
            ui.show_error(exc)
    if grid:
        b2.download_button("Download the grid file (for `python -m bdft_core sweep --grid`)",
                           json.dumps(grid, indent=1), file_name=f"{name}.json", mime="application/json",
                           key="sw_grid_dl")

job_id = st.session_state.get("sw_job")
if job_id is None:
    latest = ui.jobs().latest("sweep")
    job_id = latest.id if latest else None
ui.job_panel(job_id, key="sw")

job = ui.jobs().get(job_id) if job_id else None
running = job.params["spec"]["name"] if job and job.active else None
names = list(sweeps) + ([running] if running and running not in sweeps else [])
if not names:
    st.info("No sweep yet: define a grid above and start it.")
    st.stop()
if st.session_state.get("sw_pick") not in names:
    st.session_state["sw_pick"] = names[0]
pick = st.selectbox("Results of", names, key="sw_pick", persist_state="session", help="Stored sweeps, the most recently updated first")
live = pick == running
if pick in sweeps:
    st.caption(f"Axes: {', '.join(sf.axis_label(a) for a in sweeps[pick]['axes'])}.")


def results() -> None:
    if live and not ui.jobs().get(job_id).active:
        st.rerun()  # the sweep ended: leave the polling fragment, redraw with the job's summary
    if live and SweepRecords(store, pick).spec() is None:
        st.caption("The sweep is starting: its cells appear here as they finish.")
        return
    try:
        spec = load_spec(store, pick)
        rows = sweep_rows(store, spec)
    except Exception as exc:
        ui.show_error(exc)
        return
    axes = list(spec.axes)
    n_done = sum(r["status"] == "finished" for r in rows)
    st.progress(n_done / len(rows), text=f"{n_done} of {len(rows)} cells finished")
    if not n_done:
        if live:
            st.caption("The first cells appear here as they finish.")
        else:  # stopped early, every cell failed, or its runs were deleted: it can still be run
            st.caption("No cell of this sweep is finished.")
            resume_button(len(rows), spec)
        return
    v = sf.default_views(axes, rows)
    metrics = list(sf.METRICS)
    metric = st.selectbox("Show", metrics, index=metrics.index(v["metric"]), key="sw_metric", persist_state="session",
                          format_func=sf.metric_label)
    varying = [a for a in axes if len(sf.axis_values(rows, a)) > 1] or axes
    figs = []
    if len(varying) >= 2:
        h1, h2 = st.columns(2)
        x = h1.selectbox("Across", varying, index=varying.index(v["x"]) if v.get("x") in varying else 0,
                         key="sw_hx", persist_state="session", format_func=sf.axis_label)
        ys = [a for a in varying if a != x]
        y = h2.selectbox("Down", ys, index=ys.index(v["y"]) if v.get("y") in ys else 0, key="sw_hy", persist_state="session",
                         format_func=sf.axis_label)
        where = {}
        others = [a for a in varying if a not in (x, y) and a != "seed"]
        cols = st.columns(max(1, len(others)))
        for col, a in zip(cols, others):
            vals = sf.axis_values(rows, a)
            first = vals[0]
            if a == "defense":  # a map "after defense" starts on a real defense (SFT first), not on 'none'
                first = "sft" if "sft" in vals else next((d for d in vals if d != "none"), vals[0])
            default = (v.get("where") or {}).get(a, first)
            where[a] = col.selectbox(f"with {sf.axis_label(a)}", vals, index=vals.index(default) if default in vals
                                     else 0, key=f"sw_where_{a}", persist_state="session", format_func=str)
        try:
            fig = sf.heatmap_figure(rows, x, y, metric, where=where or None, axes=axes)
            st.plotly_chart(fig, key=f"sw_heat_{n_done}")
            figs.append(fig)
        except ValueError as exc:
            st.warning(str(exc))
    l1, l2 = st.columns(2)
    lx = l1.selectbox("Line plot along", varying, index=varying.index(v["line_x"]) if v.get("line_x") in varying
                      else 0, key="sw_lx", persist_state="session", format_func=sf.axis_label)
    groups = ["(none)"] + [a for a in varying if a not in (lx, "seed")]
    g = l2.selectbox("One line per", groups, index=groups.index(v["group"]) if v.get("group") in groups else 0,
                     key="sw_lg", persist_state="session", format_func=lambda a: a if a == "(none)" else sf.axis_label(a))
    try:
        fig = sf.lines_figure(rows, lx, metric, group=None if g == "(none)" else g,
                              spread="seed" if "seed" in axes else None, axes=axes)
        st.plotly_chart(fig, key=f"sw_lines_{n_done}")
        figs.append(fig)
        st.caption("Lines: the mean over the other settings" + (" and seeds; the band spans the lowest to the "
                                                                   "highest seed" if "seed" in axes else "") + ". "
                   + figures.CAPTIONS["asr"])
    except ValueError as exc:
        st.warning(str(exc))
    st.dataframe(sf.table_rows(rows, axes), hide_index=True, key="sw_table")
    try:  # poisoned models not fit to study make their cells' defense figures meaningless: say so
        unfit = sf.unfit_trainings(rows, lambda rid: store.get(rid).model.get("num_classes"),
                                   spec.base.get("poison_rate"))
    except Exception:  # a damaged record: the table above still stands
        unfit = {}
    if unfit:
        first = next(iter(unfit.values()))
        st.warning(f"{figures.count(len(unfit), 'poisoned model')} of this sweep "
                   f"{'is' if len(unfit) == 1 else 'are'} not fit to study, so the defenses' figures in "
                   f"{'its cells' if len(unfit) == 1 else 'their cells'} say little. For example: {first}",
                   icon=":material/warning:")
    d1, d2 = st.columns(2)
    d1.download_button("Download CSV", sf.rows_csv(rows, axes), file_name=f"{pick}.csv", mime="text/csv",
                       key="sw_csv")
    d2.download_button("Download HTML report", sf.html_report(f"bdft sweep {pick}", spec.to_dict(), rows, axes, figs),
                       file_name=f"{pick}.html", mime="text/html", key="sw_html")
    missing = len(rows) - n_done
    if missing and not live:
        resume_button(missing, spec)


def resume_button(missing: int, spec) -> None:
    if st.button(f"Resume: run the {figures.count(missing, 'missing cell')}", key="sw_resume"):
        try:
            st.session_state["sw_job"] = ui.jobs().submit("sweep", title=f"sweep {pick} (resumed)",
                                                          spec=spec.to_dict(), executor=executor,
                                                          address=address or None)  # as set above
            st.rerun()
        except Exception as exc:
            ui.show_error(exc)


if live:
    st.fragment(results, run_every=2.0)()
else:
    results()
