"""Streamlit helpers shared by the pages (the only Streamlit code outside app.py and pages/).

Server-wide resources (the run store, the job manager, datasets) are cached once per server with
``st.cache_resource``; jobs run in the job manager's background thread, and :func:`job_panel`
polls them every two seconds in a fragment, so the rest of the page stays responsive."""
from __future__ import annotations

import os

import streamlit as st

from bdft_core import figures
from bdft_core.errors import BdftError


@st.cache_resource(show_spinner=False)
def _store(root: str):
    from bdft_core.runs import RunStore

    return RunStore(root)


@st.cache_resource(show_spinner=False)
def _jobs(root: str):
    from bdft_core.jobs import JobManager

    return JobManager(_store(root))


def runs_root() -> str:
    from bdft_core.runs import runs_dir

    return str(runs_dir())


def store():
    return _store(runs_root())


def jobs():
    return _jobs(runs_root())


@st.cache_resource(show_spinner="Loading the dataset (once per server)…")
def dataset(name: str, data_dir: str | None = None):
    """A registry dataset on the CPU (for previews and sizes), loaded once per server."""
    from bdft_core.data import load_dataset

    return load_dataset(name, root=data_dir)


def load_preview_data(name: str):
    return dataset(name, os.environ.get("BDFT_DATA_DIR"))


@st.cache_data(show_spinner=False, ttl=30)
def _available(data_dir: str | None) -> dict[str, str]:
    from bdft_core.data import available_datasets as avail

    return avail()


def available_datasets() -> dict[str, str]:
    """Datasets usable without a download: name -> where they are."""
    return _available(os.environ.get("BDFT_DATA_DIR"))


@st.cache_resource(show_spinner=False)
def device_text() -> str:
    from bdft_core.device import describe_device, pick_device

    return describe_device(pick_device())


def default_dataset() -> str:
    """CIFAR-10 where it is on disk, else the always-available digits."""
    avail = available_datasets()
    return "cifar10" if "cifar10" in avail else "digits"


def run_choice(ids: list[str], key: str) -> int:
    """Where a page's run picker starts: on a first visit, the run the user last worked with (picked
    on another page, trained or demonstrated) rather than the newest one, which after a sweep is one
    of its cells; afterwards the page keeps its own choice (its widget state)."""
    focus = st.session_state.get("bdft_focus")
    return ids.index(focus) if key not in st.session_state and focus in ids else 0


def set_focus(run_id: str | None) -> None:
    """The run the user is working with, offered first by the other pages' run pickers."""
    if run_id:
        st.session_state["bdft_focus"] = run_id


def show_error(exc: Exception) -> None:
    """A readable message, never a traceback."""
    if isinstance(exc, BdftError):
        st.error(str(exc), icon=":material/error:")
    else:
        st.error(f"Something went wrong ({type(exc).__name__}): {exc}", icon=":material/error:")


def sidebar() -> None:
    with st.sidebar:
        st.markdown(f"**Device:** {device_text()}")
        avail = available_datasets()
        st.markdown("**Datasets here:** " + ", ".join(sorted(avail)))
        if os.environ.get("BDFT_OFFLINE", "").lower() in ("1", "true", "yes"):
            st.caption("Offline mode (BDFT_OFFLINE): other datasets must be placed in BDFT_DATA_DIR.")
        else:
            st.caption("Others download on first use when this machine is online.")
        _sidebar_jobs()


@st.fragment(run_every=2.0)
def _sidebar_jobs() -> None:
    """The running job, on every page, refreshed every two seconds."""
    active = jobs().active()
    if active:
        j = next((a for a in active if a.status == "running"), active[-1])
        st.markdown(f"**Running:** {j.title}")
        st.progress(j.overall_fraction, text=j.describe())
        if len(active) > 1:
            st.caption(f"{len(active) - 1} more job(s) waiting in the queue")


def param_widgets(defaults: dict, help_: dict, prefix: str, choices: dict | None = None,
                  skip: tuple = (), labels: dict | None = None) -> dict:
    """One widget per setting, chosen by the default's type; returns the values set."""
    out = {}
    choices = choices or {}
    for name, default in defaults.items():
        if name in skip:
            continue
        key, label, hlp = f"{prefix}_{name}", name.replace("_", " "), help_.get(name, "")
        if isinstance(default, bool):
            out[name] = st.checkbox(label, value=default, key=key, persist_state="session", help=hlp)
        elif name in choices:
            opts = list(choices[name])
            fmt = (labels or {}).get(name)
            out[name] = st.selectbox(label, opts, index=opts.index(default) if default in opts else 0, key=key, persist_state="session",
                                     help=hlp, format_func=(lambda v, f=fmt: f.get(v, v)) if fmt else str)
        elif isinstance(default, int):
            out[name] = int(st.number_input(label, value=default, step=1, key=key, persist_state="session", help=hlp))
        elif isinstance(default, float):
            out[name] = float(st.number_input(label, value=float(default), format="%.4g", key=key, persist_state="session", help=hlp))
        else:
            out[name] = st.text_input(label, value=str(default), key=key, persist_state="session", help=hlp)
    return out


def job_panel(job_id: str | None, key: str) -> None:
    """Live view of one job: progress with ETA, a Stop button, curves, then results or the error.
    While the job is active the panel refreshes itself every LIVE_REFRESH_S seconds."""
    if not job_id:
        return
    j = jobs().get(job_id)
    if j is None:
        return
    if j.active:
        _live_panel(job_id, key)
    else:
        _render_job(j, key)


# How often a running job's panel redraws. Every redraw makes the browser re-render the panel's plotly
# curves, and on a 2-core machine that browser takes CPU from the training: in the CIFAR-10 demo's
# first 70 s (2026-11-27, browser on the same machine) Chromium used 5.8 s of CPU per 30 s at 1 s and
# 4.2 s at 2 s, and training reached step 146 against 172.
LIVE_REFRESH_S = 2.0


@st.fragment(run_every=LIVE_REFRESH_S)
def _live_panel(job_id: str, key: str) -> None:
    j = jobs().get(job_id)
    if j is None:
        return
    _render_job(j, key)
    if not j.active:
        st.rerun()  # leave the polling fragment, redraw the page with the results


def _render_job(j, key: str) -> None:
    from bdft_core.jobs import stage_title

    if j.kind in ("attack", "demo") and j.result and j.result.get("run_id"):
        focused = st.session_state.setdefault("bdft_focused_jobs", set())
        if j.id not in focused:  # once per job: a later pick on another page is the user's to keep
            focused.add(j.id)
            set_focus(j.result["run_id"])

    with st.container(border=True):
        head, btn = st.columns([5, 1])
        head.markdown(f"**{j.title}** — {j.status}")
        if j.active:
            if btn.button("Stop", key=f"{key}_stop", help="End the job within a step, keeping what it reached"):
                jobs().stop(j.id)
            pos = jobs().queue_position(j.id)
            if j.status == "queued":
                st.info(f"Waiting in the queue (position {pos}); it starts when the running job ends.")
            st.progress(j.overall_fraction, text=j.describe())
        if j.error:
            st.error(j.error, icon=":material/error:")
        if any(j.series.values()):
            st.plotly_chart(figures.curves_figure(j.series), key=f"{key}_curves_{len(sum(j.series.values(), []))}")
            st.caption(figures.CAPTIONS["curves"])
        r = j.result
        if r and j.kind in ("demo", "defend") and r.get("defended") is not None:
            # a transfer stopped in its attacker's stage has no poisoned (victim) model to show; a defend job
            # whose defenses all failed has only the reasons below
            if r.get("poisoned") and j.status != "failed":
                rows = [{"name": "poisoned", **r["poisoned"]}] + [{"name": n, **d} for n, d in r["defended"].items()]
                st.plotly_chart(figures.before_after_figure(rows), key=f"{key}_bars")
                st.caption(figures.CAPTIONS["before_after"])
                stages = figures.paradigm_rows(r)
                if stages:
                    st.caption("How the backdoor travelled (each model on its own test set):")
                    st.dataframe(stages, hide_index=True)
                st.dataframe(figures.summary_rows(r["poisoned"], r["defended"]), hide_index=True)
                st.info(figures.conclusion(r["poisoned"], r["defended"]), icon=":material/lightbulb:")
                reading = figures.transfer_reading(r)
                if reading:
                    st.warning(reading, icon=":material/info:")
            kept = " (the other defenses' results are kept)" if r["defended"] else ""
            for f in r.get("failed", []):
                st.error(f"{figures.label_of(f['defense'])} failed: {f['error']}{kept}")
            for sk in r.get("skipped", []):
                st.warning(f"{figures.label_of(sk['defense'])} skipped: {sk['reason']}")
            if r.get("seconds"):
                st.caption(f"Whole job: {r['seconds']:.0f} s. Every model is stored: compare or export them "
                           "on the Runs page.")
            st.page_link("pages/runs.py", label="Open the stored runs", icon=":material/table_chart:")
        elif r and j.kind == "sweep":
            say = st.warning if r.get("failed") or j.status == "stopped" else st.success
            say(f"Sweep {r['name']}: {len(r['ran'])} cell(s) run on {r['where'] or 'nothing (all were done)'}, "
                f"{len(r['reused'])} already finished"
                + (f", {len(r['failed'])} failed" if r.get("failed") else "")
                + f", in {r['seconds']:.0f} s. Each cell is a stored run (Runs page).")
            for f in r.get("failed", []):
                st.error(f"cell {f['values']} failed: {f['error']} (left missing: resume to retry it)")
        elif r and j.kind == "sequela":
            if r.get("stopped"):  # a stopped measurement is not kept (sequela_runs saves only whole ones)
                st.warning(f"Stopped after {r['seconds']:.0f} s: nothing was kept; press Measure again for a "
                           "whole measurement.")
            else:
                st.success(f"Sequela measured in {r['seconds']:.0f} s and kept with run `{r['run_id']}`.")
        elif r and j.kind == "pretrain":
            probes = ", ".join(f"{k} {figures.pct(v['acc'])}" for k, v in r["linear_probe"].items())
            if r.get("stopped"):
                st.warning(f"Stopped early: the partly pretrained encoder is written to `{r['encoder']}` and listed "
                           "as stopped early under the encoder paradigm's settings; pretrain again for a full one.")
            else:
                st.success(f"Encoder written to `{r['encoder']}` in {r['seconds']:.0f} s; linear-probe accuracy: "
                           f"{probes or 'not measured'}. Pick it under the encoder settings of the encoder paradigm.")
        elif r and j.kind == "attack":
            c1, c2, c3 = st.columns(3)
            c1.metric("Clean accuracy (CA)", figures.pct(r.get("clean_acc")), help=figures.CAPTIONS["ca"])
            c2.metric("Attack success rate (ASR)", figures.pct(r.get("asr")), help=figures.CAPTIONS["asr"])
            c3.metric("Seconds", f"{r.get('seconds') or 0:.1f}")
            warn = figures.training_warning(r.get("clean_acc"), r.get("asr"), r.get("num_classes"), r.get("poison_rate"))
            if warn:
                st.warning(warn, icon=":material/warning:")
            st.caption(f"Stored as run `{r['run_id']}`: defend it in the Defense lab.")
            st.page_link("pages/defense_lab.py", label="Open the Defense lab", icon=":material/shield:")
        if j.status == "stopped" and j.kind == "sweep":
            st.warning("Stopped: the finished cells are kept; resume the sweep to run only the missing ones.")
        elif j.status == "stopped" and j.kind == "sequela" and not r:
            st.warning("Stopped before it began: nothing was measured, so nothing was kept.")
        elif j.status == "stopped" and j.kind not in ("pretrain", "sequela"):
            st.warning(f"Stopped during {stage_title(j.stage)}; what was reached is stored as run(s): "
                       + (", ".join(j.run_ids) or "none"))
        elif j.status == "failed" and j.run_ids:
            st.info("Stored before the failure, and kept: run(s) " + ", ".join(j.run_ids) + " (Runs page).")


def reversed_trigger_panel(run, nc_run) -> None:
    """Neural Cleanse's reversed trigger for each flagged class next to the attack's real trigger."""
    try:
        art = store().load_artefacts(nc_run.id)
    except BdftError as exc:
        show_error(exc)
        return
    if "masks" not in art:
        return
    st.subheader("Neural Cleanse: the trigger it reverse-engineered")
    flagged = [int(k) for k in art.get("flagged", [])]
    norms = art.get("mask_l1")
    shown = flagged or ([int(norms.argmin())] if norms is not None else [0])
    cols = st.columns(len(shown) + 1)
    try:
        attack, shape = figures.attack_of_run(run)
        cols[0].image(figures.trigger_on_grey(attack, shape), caption=f"real trigger (target {run.attack.get('target')})")
    except Exception:  # noqa: BLE001 - an attack that needs data to draw its trigger
        cols[0].caption("The real trigger depends on the data; see the Attack lab's preview.")
    for col, k in zip(cols[1:], shown):
        col.image(figures.reversed_trigger_display(art["masks"][k], art["patterns"][k]),
                  caption=f"reversed for class {k}" + (" (flagged)" if k in flagged else " (smallest mask, not flagged)"))
    st.caption("Neural Cleanse searches, for every class, the smallest patch that turns any image into that class. "
               "A class whose patch is much smaller than the others' is flagged as the backdoor's target.")


@st.cache_data(show_spinner="Finding the flagged training images…", max_entries=8)
def _flagged_images(run_id: str, d_run_id: str, n: int):
    import torch

    from bdft_core.pipeline import training_images

    art = store().load_artefacts(d_run_id)
    idx = art.get("flagged_idx")
    if idx is None or len(idx) == 0:
        return None
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:n]]
    imgs = training_images(store().get(run_id), pick)
    return ([figures.to_display(x.float() / 255.0, 3) for x in imgs["x"]],
            [f"label {int(y)}" + (" · poisoned" if p else " · clean") for y, p in zip(imgs["y"], imgs["poisoned"])])


def flagged_panel(run, d_run, n: int = 12) -> None:
    """A sample of the training images a data cleanser (or ABL) flagged, each marked poisoned or clean."""
    st.subheader(f"{d_run.defense.get('title', d_run.name)}: training images it flagged")
    f = d_run.final
    if "precision" in f:
        st.caption(f"Flagged {f.get('n_flagged')} of the training images; {figures.pct(f.get('precision'))} of them were "
                   f"truly poisoned (precision) and they cover {figures.pct(f.get('recall'))} of the "
                   f"{f.get('n_poisoned')} poisoned images (recall).")
    try:
        got = _flagged_images(run.id, d_run.id, n)
    except BdftError as exc:
        show_error(exc)
        return
    if got is None:
        st.caption("It flagged no images.")
        return
    st.image(got[0], caption=got[1])


@st.cache_data(show_spinner=False, max_entries=16)
def layer_choices(run_id: str) -> tuple[list[str], list[str], str]:
    """A run's Grad-CAM layers (names, labels with map sizes) and the default, read once per run."""
    from bdft_core import explain

    run, model = store().load_model(run_id)
    shape = (run.model["channels"], *run.model["image_size"])
    layers = explain.conv_layers(model, shape)
    return ([n for n, _, _ in layers], [f"{n} ({h}x{w})" for n, _, (h, w) in layers],
            explain.default_layer(model, shape))
