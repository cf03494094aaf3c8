"""Runs: every stored run; compare, delete, export (CSV, JSON, standalone HTML report)."""
import datetime as dt

import streamlit as st

import ui
from bdft_core import figures, report

st.title("Runs")
if "runs_msg" in st.session_state:
    st.success(st.session_state.pop("runs_msg"))
st.caption("Every poisoned model (attack) and every defended model (defense) trained here, newest first.")

if st.session_state.pop("runs_after_delete", False):  # before the widgets: nothing stays selected or armed,
    st.session_state["runs_select"] = []  # so a second click cannot delete runs the user never picked
    st.session_state["runs_delete_confirm"] = False
rows = ui.store().list()
if not rows:
    st.info("No runs stored yet: run the quick demo on the Home page or train one in the Attack lab.")
    st.stop()
table = [{"created": dt.datetime.fromtimestamp(r["created"]).strftime("%m-%d %H:%M"), "kind": r["kind"],
          "what": figures.label_of(r["name"]) if r["kind"] == "defense" else r["name"], "dataset": r["dataset"],
          "CA": None if r["clean_acc"] is None else 100 * r["clean_acc"],
          "ASR": None if r["asr"] is None else 100 * r["asr"],
          "seconds": r["seconds"], "status": r["status"], "run": r["id"],
          "from": r["parent"] or ""} for r in rows]
st.dataframe(table, hide_index=True, column_config={
    "CA": st.column_config.NumberColumn("CA", format="%.1f%%", help="clean accuracy (higher is better)"),
    "ASR": st.column_config.NumberColumn("ASR", format="%.1f%%", help="attack success rate (lower is better)"),
    "seconds": st.column_config.NumberColumn("seconds", format="%.1f"),
    "run": st.column_config.TextColumn("run id"),
    "from": st.column_config.TextColumn("from", help="the run this one was made from: a defense's poisoned model, "
                                                     "a victim's attacker")})
st.caption("CA: clean accuracy (higher is better). ASR: attack success rate (lower is better after a defense). "
           "A defense run's 'from' is the poisoned run it cleaned.")

ids = [r["id"] for r in rows]
names = {r["id"]: f"{figures.label_of(r['name']) if r['kind'] == 'defense' else r['name']} ({r['kind']}) on "
                 f"{r['dataset']} · ASR {figures.pct(r['asr'])} · {r['id'][-6:]}" for r in rows}
if "runs_select" not in st.session_state:  # start with the newest poisoned model and its defenses
    newest = next((r for r in rows if r["kind"] in ("attack", "victim")), rows[0])
    st.session_state["runs_select"] = [newest["id"]] + [r["id"] for r in rows if r["parent"] == newest["id"]]
sel = st.multiselect("Select runs to compare or export", ids, key="runs_select", persist_state="session", format_func=names.get,
                     help="Pick a poisoned run and its defenses to see them side by side")
chosen = []
for i in sel:  # a run whose record is damaged is reported and left out; it can still be deleted below
    try:
        chosen.append(ui.store().get(i))
    except Exception as exc:
        ui.show_error(exc)
if chosen:
    st.plotly_chart(figures.compare_figure(chosen), key="runs_compare")
    st.caption(figures.CAPTIONS["curves"])
    st.plotly_chart(figures.before_after_figure(figures.run_bar_rows(chosen)), key="runs_bars")
    st.caption(figures.CAPTIONS["before_after"])
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("CSV (key figures)", report.runs_csv(chosen), f"bdft-runs-{stamp}.csv", "text/csv",
                       key="runs_csv", help="One row per run: CA, ASR, seconds, settings")
    c2.download_button("CSV (curves)", report.history_csv(chosen), f"bdft-curves-{stamp}.csv", "text/csv",
                       key="runs_curves_csv", help="Every recorded curve point")
    c3.download_button("JSON", report.runs_json(chosen), f"bdft-runs-{stamp}.json", "application/json",
                       key="runs_json", help="The full run records")
    c4.download_button("HTML report", report.html_report(chosen), f"bdft-report-{stamp}.html", "text/html",
                       key="runs_html", help="A standalone page with the figures, to email or archive")
    if len(chosen) == 1:
        path = ui.store().path(chosen[0].id) / "model.safetensors"
        try:
            weights = path.read_bytes()
        except OSError as exc:
            st.warning(f"The checkpoint of run {chosen[0].id} cannot be read ({exc.strerror or exc}); its figures "
                       "above come from its record.")
        else:
            st.download_button("Checkpoint (.safetensors)", weights, f"{chosen[0].id}.safetensors",
                               "application/octet-stream", key="runs_ckpt",
                               help="The weights with the run's record; load it again in the Attack lab")
if sel:
    with st.expander("Delete the selected runs"):
        st.caption("Deleting a poisoned run also deletes the defenses made from it. This cannot be undone.")
        sure = st.checkbox("Yes, delete them", key="runs_delete_confirm", persist_state="session", help="A safety catch for the button below")
        if st.button("Delete", key="runs_delete", disabled=not sure, help="Remove the selected runs and their files"):
            removed = []
            for i in sel:
                try:
                    removed += ui.store().delete(i)
                except Exception:
                    pass  # already removed with its parent
            st.session_state["runs_after_delete"] = True
            st.session_state["runs_msg"] = f"Deleted {len(removed)} run(s)."
            st.rerun()
