"""Background jobs for interactive front ends (the dashboard), with no UI code.

A :class:`JobManager` owns one worker thread and a FIFO queue: jobs run one at a time (a second
job waits instead of fighting the first for the CPU), each in the background, and report through
the library's trainer callbacks. A front end polls :meth:`JobManager.get` for a consistent
snapshot (status, stage, progress with ETA, live CA/ASR series, result or a readable error) and
calls :meth:`JobManager.stop` to end a job within a training step, keeping what it reached.

Kinds of job (``submit(kind, **params)``):

- ``"attack"``: ``config`` (an :class:`~bdft_core.pipeline.AttackConfig` dict): poison + train.
- ``"defend"``: ``parent`` (a poisoned run id), ``defenses`` (names), ``params`` (per defense
  name), ``clean_fraction``: each defense in turn, each a child run.
- ``"demo"``: ``config``, ``defenses``, ``clean_fraction``: the whole story.
- ``"pretrain"``: ``dataset``, ``epochs``, ``out`` (and other :func:`bdft_core.ssl.pretrain_encoder`
  settings): a clean SimCLR encoder for the encoder paradigm.
- ``"sequela"``: ``run_id``, ``axes``: the sequela of a poisoned run and its defended children.
- ``"sweep"``: ``spec`` (a grid as a dict), ``executor``, ``address``: run or resume a sweep
  (:func:`bdft_core.sweeps.run_sweep`); progress counts finished cells, whose results are on disk
  as they arrive (:func:`bdft_core.sweeps.sweep_rows`).

Jobs live in the server process (a browser refresh finds them again); their results are
ordinary runs in the :class:`~bdft_core.runs.RunStore`."""
from __future__ import annotations

import copy
import gc
import itertools
import logging
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .errors import BdftError, ConfigError

log = logging.getLogger("bdft.jobs")

KINDS = ("attack", "defend", "demo", "pretrain", "sequela", "sweep")
ACTIVE = ("queued", "running")
LIVE_EVALS = 20  # live CA/ASR points per training stage in the dashboard
LIVE_SAMPLES = 500  # test images per live evaluation (final figures use the whole test set)


@dataclass
class Job:
    id: str
    kind: str
    title: str
    params: dict[str, Any]
    status: str = "queued"  # queued | running | finished | stopped | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stages: list[str] = field(default_factory=list)  # e.g. ["attack", "ft", "sft"]
    stage: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # step, total_steps, fraction, eta_s, ...
    series: dict[str, list[dict]] = field(default_factory=dict)  # stage -> live points
    result: dict[str, Any] | None = None
    run_ids: list[str] = field(default_factory=list)
    error: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def snapshot(self) -> "Job":
        c = copy.copy(self)
        c.params = copy.deepcopy(self.params)
        c.stages = list(self.stages)
        c.progress = dict(self.progress)
        c.series = {k: list(v) for k, v in self.series.items()}
        c.result = copy.deepcopy(self.result)
        c.run_ids = list(self.run_ids)
        return c

    @property
    def overall_fraction(self) -> float:
        """Progress over all stages, 0..1 (stages weighted equally)."""
        if self.status in ("finished",):
            return 1.0
        n = max(1, len(self.stages))
        i = self.stages.index(self.stage) if self.stage in self.stages else 0
        return min(1.0, (i + float(self.progress.get("fraction", 0.0))) / n)

    def describe(self) -> str:
        """One line for a progress bar: stage, step, epoch and ETA."""
        if self.status == "queued":
            return "waiting for the running job to finish"
        if self.status != "running":
            return self.status
        p = self.progress
        bits = [f"overall {100 * self.overall_fraction:.0f}%"]
        if self.stages:
            i = self.stages.index(self.stage) + 1 if self.stage in self.stages else 1
            bits.append(f"stage {i}/{len(self.stages)}: {stage_title(self.stage)}")
        if p.get("total_steps"):
            bits.append(f"step {p['step']}/{p['total_steps']} (epoch {p.get('epoch', 0):.1f})")
        eta = p.get("eta_s")
        if eta is not None and math.isfinite(eta):
            bits.append(f"about {eta:.0f} s left in this stage")
        if p.get("message"):
            return " · ".join(bits + [str(p["message"])])
        return " · ".join(bits) if p.get("total_steps") else " · ".join(bits + ["preparing data"])


def stage_title(stage: str | None) -> str:
    if stage in (None, "attack"):
        return "attack training"
    if stage == "pretrain":
        return "SimCLR pretraining"
    if stage == "sequela":
        return "sequela measurements"
    if stage == "sweep":
        return "sweep cells"
    if stage == "probe":
        return "linear probes"
    if stage == "clean_probe":
        return "victim's probe on the clean encoder"
    if stage in ("victim_head", "victim_full"):
        return "victim's transfer (new head only)" if stage == "victim_head" else "victim's transfer (whole model)"
    from .defenses import DEFENSES

    cls = DEFENSES.get(stage)
    return cls.title if cls else stage


def _eval_every(total_steps: int) -> int:
    return max(1, total_steps // LIVE_EVALS)


class JobManager:
    """One worker thread, one queue; thread-safe snapshots for pollers."""

    def __init__(self, store=None, max_finished: int = 50):
        from .runs import RunStore

        self.store = store or RunStore()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._ids = itertools.count(1)
        self._max_finished = max_finished
        self._worker = threading.Thread(target=self._loop, name="bdft-jobs", daemon=True)
        self._worker.start()

    # -- public API ----------------------------------------------------------------------------
    def submit(self, kind: str, title: str | None = None, **params) -> str:
        """Queue a job; checks its settings first (a bad setting raises ConfigError now, not later)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown job kind {kind!r}: use one of {', '.join(KINDS)}")
        stages = self._check(kind, params)
        with self._lock:
            jid = f"job-{next(self._ids)}-{int(time.time())}"
            self._jobs[jid] = Job(jid, kind, title or kind, params, stages=stages)
            self._trim()
        self._queue.put(jid)
        return jid

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            j = self._jobs.get(job_id)
            return j.snapshot() if j else None

    def list(self) -> list[Job]:
        """All known jobs, newest first."""
        with self._lock:
            return [j.snapshot() for j in sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)]

    def active(self) -> list[Job]:
        return [j for j in self.list() if j.active]

    def latest(self, kind: str | None = None) -> Job | None:
        for j in self.list():
            if kind is None or j.kind == kind or (isinstance(kind, tuple) and j.kind in kind):
                return j
        return None

    def latest_for(self, kind: str, **params) -> Job | None:
        """The newest job of ``kind`` whose parameters include ``params`` (the newest defend job of
        one poisoned run, say): a page shows that run's results, not another run's."""
        for j in self.list():
            if j.kind == kind and all(j.params.get(k) == v for k, v in params.items()):
                return j
        return None

    def queue_position(self, job_id: str) -> int:
        """0 for the running job, 1.. for waiting ones, -1 if neither."""
        with self._lock:
            waiting = sorted((j for j in self._jobs.values() if j.active), key=lambda j: j.created)
        for i, j in enumerate(waiting):
            if j.id == job_id:
                return i if waiting[0].status == "running" else i + 1
        return -1

    def stop(self, job_id: str) -> None:
        """Ask a job to stop: a queued job is cancelled, a running one ends within a step."""
        with self._lock:
            j = self._jobs.get(job_id)
            if j is None:
                return
            j.stop_event.set()
            if j.status == "queued":
                j.status, j.ended = "stopped", time.time()

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job is no longer active (for scripts and tests)."""
        t_end = None if timeout is None else time.monotonic() + timeout
        while True:
            j = self.get(job_id)
            if j is None or not j.active:
                return j
            if t_end is not None and time.monotonic() > t_end:
                return j
            time.sleep(0.05)

    # -- internals ----------------------------------------------------------------------------
    def _check(self, kind: str, params: dict) -> list[str]:
        from .data import check_clean_fraction
        from .defenses import build_defense
        from .pipeline import AttackConfig

        if kind in ("attack", "demo"):
            cfg = params.get("config") or {}
            AttackConfig.from_dict(cfg).validate()
        if kind in ("defend", "demo"):
            names = list(params.get("defenses") or [])
            if not names:
                raise ConfigError("pick at least one defense")
            per = params.get("params") or {}
            for n in names:
                build_defense(n, **(per.get(n) or {}))
            check_clean_fraction(params.get("clean_fraction", 0.2))
        if kind == "sequela":
            from .sequela_runs import check_axes

            if not params.get("run_id"):
                raise ConfigError("pick a poisoned run to measure")
            self.store.get(params["run_id"])
            check_axes(params.get("axes"))
            return ["sequela"]
        if kind == "sweep":
            from .sweeps import EXECUTORS, SweepSpec

            params["spec"] = SweepSpec.from_dict(params.get("spec") or {}).to_dict()
            if params.get("executor", "auto") not in EXECUTORS:
                raise ConfigError(f"unknown executor {params.get('executor')!r}: use {', '.join(EXECUTORS)}")
            return ["sweep"]
        if kind == "pretrain":
            if not str(params.get("out", "")).endswith(".safetensors"):
                raise ConfigError("the encoder file must end in .safetensors")
            if not float(params.get("epochs", 1)) > 0:
                raise ConfigError("epochs must be positive")
            return ["pretrain", "probe"]
        if kind == "defend":
            if not params.get("parent"):
                raise ConfigError("pick a poisoned run to defend")
            self.store.get(params["parent"])  # RunNotFound now rather than in the worker
        first = []
        if kind in ("attack", "demo"):
            first = ["attack"]
            paradigm = (params.get("config") or {}).get("paradigm")
            if paradigm == "transfer":
                from .paradigms import check_paradigm_params
                from .paradigms.transfer import victim_stages

                pp = check_paradigm_params(AttackConfig.from_dict(params.get("config") or {}))  # defaults filled in
                first += [f"victim_{how}" for how in victim_stages(pp)]
            elif paradigm == "encoder":
                first = ["clean_probe", "attack", "victim_head"]
        return first + list(params.get("defenses") or [])

    def _trim(self) -> None:
        done = sorted((j for j in self._jobs.values() if not j.active), key=lambda j: j.created)
        for j in done[:-self._max_finished] if len(done) > self._max_finished else []:
            del self._jobs[j.id]

    def _update(self, job: Job, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(job, k, v)

    def _callbacks(self, job: Job):
        def on_batch(p):
            with self._lock:
                job.progress = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
                                "fraction": p.fraction, "eta_s": p.eta_s, "loss": p.loss, "lr": p.lr,
                                "images_per_s": p.images_per_s, "elapsed_s": p.elapsed_s}

        def on_eval(p):
            if p.clean_acc is None and p.asr is None:
                return
            point = {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "fraction": p.fraction,
                     "clean_acc": p.clean_acc, "asr": p.asr, "loss": p.loss, "lr": p.lr,
                     "elapsed_s": p.elapsed_s}
            with self._lock:
                job.series.setdefault(job.stage or "attack", []).append(point)

        return [("on_batch", on_batch), ("on_step", on_eval), ("on_epoch_end", on_eval)]

    def _set_stage(self, job: Job, stage: str) -> None:
        with self._lock:
            job.stage = stage
            job.progress = {"step": 0, "total_steps": 0, "fraction": 0.0}

    def _loop(self) -> None:
        while True:
            jid = self._queue.get()
            with self._lock:
                job = self._jobs.get(jid)
                if job is None or job.status != "queued":
                    continue
                job.status, job.started = "running", time.time()
            try:
                result = self._execute(job)
                stopped = job.stop_event.is_set() and _ended_early(job, result)
                failure = None if stopped else _nothing_done(job.kind, result)
                status = "stopped" if stopped else "failed" if failure else "finished"
                self._update(job, result=result, status=status, error=failure, ended=time.time())
            except BdftError as exc:
                self._update(job, error=str(exc), status="failed", ended=time.time())
            except BaseException as exc:  # never let the worker die (SystemExit too); the trace goes to the log
                log.error("job %s failed:\n%s", jid, traceback.format_exc())
                self._update(job, error=f"unexpected error ({type(exc).__name__}): {exc}", status="failed",
                             ended=time.time())
            finally:
                # A job leaves large tensors behind (data, models, optimizer state), some in reference
                # cycles; collect them now, once per job, rather than after every UI rerun (the
                # dashboard turns Streamlit's post-script collection off: .streamlit/config.toml).
                job = None
                gc.collect()

    def _execute(self, job: Job) -> dict:
        from .pipeline import AttackConfig, get_dataset, run_attack, run_defense, run_demo
        import torch

        p, cbs, stop = job.params, self._callbacks(job), job.stop_event
        over = {"live_samples": LIVE_SAMPLES}
        store = _Recording(self.store, job.run_ids)  # a job that fails later still names what it stored

        def attack_over(cfg: AttackConfig) -> dict:
            from .pipeline import DEFAULT_EPOCHS

            data = get_dataset(cfg.dataset, torch.device("cpu"), cfg.n_train, cfg.n_test, cfg.seed)
            epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(data.name, 4.0)
            total = math.ceil(epochs * math.ceil(len(data.y_train) / min(cfg.batch_size, len(data.y_train))))
            return {**over, "eval_every": cfg.eval_every or _eval_every(total)}

        if job.kind == "sequela":
            from .sequela_runs import sequela_run

            self._set_stage(job, "sequela")
            t0 = time.perf_counter()

            def progress(fraction, msg=""):
                el = time.perf_counter() - t0
                with self._lock:
                    job.progress = {"fraction": fraction, "message": msg, "elapsed_s": el,
                                    "eta_s": el / fraction * (1 - fraction) if fraction > 0 else float("nan")}

            res = sequela_run(self.store, p["run_id"], axes=p.get("axes"), stop=stop, progress=progress)
            return {"run_id": res["run_id"], "seconds": res["total_seconds"], "stopped": res["stopped"]}
        if job.kind == "sweep":
            from .sweeps import SweepSpec, run_sweep

            spec = SweepSpec.from_dict(p["spec"])
            self._set_stage(job, "sweep")
            self._update(job, progress={"fraction": 0.0, "message": "starting the workers and the first cells"})
            t0, done = time.perf_counter(), [0]

            def on_cell(row):
                done[0] += 1
                el = time.perf_counter() - t0
                frac = done[0] / max(1, todo)
                with self._lock:
                    job.progress = {"fraction": frac, "elapsed_s": el, "eta_s": el / frac * (1 - frac),
                                    "message": f"{done[0]} of {todo} cells finished this time"}

            from .sweeps import SweepRecords

            rec = SweepRecords(self.store, spec.name)
            todo = sum(1 for c in spec.cells() if rec.valid_cell(c.key, drop=False) is None)
            res = run_sweep(spec, self.store, executor=p.get("executor", "auto"), address=p.get("address") or None,
                            on_cell=on_cell, stop=stop)
            return {"name": spec.name, **{k: v for k, v in res.to_json().items() if k != "name"}}
        if job.kind == "pretrain":
            from .ssl import pretrain_encoder

            self._set_stage(job, "pretrain")

            def probe_stage(msg):
                if "pretraining" not in msg:
                    self._set_stage(job, "probe")

            rec = pretrain_encoder(callbacks=cbs, stop=stop, log=probe_stage, **p)
            return {"encoder": rec["weights"], "linear_probe": rec["linear_probe"], "seconds": rec["wall_s"],
                    "stopped": rec["stopped"]}
        if job.kind == "attack":
            cfg = AttackConfig.from_dict(p["config"])
            self._set_stage(job, "attack")
            run, _ = run_attack(cfg, store=store, callbacks=cbs, stop=stop, train_over=attack_over(cfg),
                                on_stage=lambda s: self._set_stage(job, s))
            return {"run_id": run.id, "clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
                    "seconds": run.timings.get("total_s"), "status": run.status,
                    "num_classes": run.model.get("num_classes"), "poison_rate": run.attack.get("poison_rate")}
        if job.kind == "defend":
            parent = self.store.get(p["parent"])
            out = {"parent": parent.id, "poisoned": {"clean_acc": parent.final.get("clean_acc"),
                                                     "asr": parent.final.get("asr")}, "defended": {}}
            for name in p["defenses"]:
                if stop.is_set():
                    break
                self._set_stage(job, name)
                d_over = {**over, "eval_every": 0}
                from .compare import applicable

                why = applicable(parent, name)
                if why:
                    out.setdefault("skipped", []).append({"defense": name, "reason": why})
                    continue
                try:
                    run, _ = run_defense(parent.id, name, params=(p.get("params") or {}).get(name),
                                         clean_fraction=p.get("clean_fraction", 0.2), store=store,
                                         callbacks=cbs, stop=stop,
                                         train_over=self._defense_over(parent, name, p, d_over))
                except Exception as exc:  # the other defenses still run; the error is shown with the result
                    if not isinstance(exc, BdftError):
                        log.error("defense %s of job %s failed:\n%s", name, job.id, traceback.format_exc())
                    out.setdefault("failed", []).append({"defense": name, "error": _reason(exc)})
                    continue
                out["defended"][name] = {"clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
                                         "seconds": run.timings.get("total_s"), "run_id": run.id,
                                         "status": run.status}
            return out
        # demo
        cfg = AttackConfig.from_dict(p["config"])
        ao = attack_over(cfg)
        return run_demo(cfg, defenses=tuple(p["defenses"]), clean_fraction=p.get("clean_fraction", 0.2),
                        store=store, callbacks=cbs, stop=stop, on_stage=lambda s: self._set_stage(job, s), train_over=ao)

    def _defense_over(self, parent, name, p, over) -> dict:
        from .defenses import build_defense
        from .pipeline import defender_size

        d = build_defense(name, **((p.get("params") or {}).get(name) or {}))
        if d.uses_poisoned_data or "batch_size" not in d.params or "epochs" not in d.params:
            return dict(over)  # not a plain fine-tuning: its own phases decide when to evaluate
        total = d.total_steps(defender_size(parent, p.get("clean_fraction", 0.2)))
        return {**over, "eval_every": _eval_every(total)}


class _Recording:
    """A job's view of the run store: notes each run id as the run is stored, so a job that fails
    after storing some runs (a demo whose SFT fails after its attack and FT) still lists them."""

    def __init__(self, store, ids: list):
        self._store, self._ids = store, ids

    def save(self, run, model, artefacts=None):
        out = self._store.save(run, model, artefacts=artefacts)
        if run.id not in self._ids:
            self._ids.append(run.id)
        return out

    def __getattr__(self, name):
        return getattr(self._store, name)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, BdftError) else f"unexpected error ({type(exc).__name__}): {exc}"


def _ended_early(job: Job, result) -> bool:
    """Whether a job whose Stop was pressed did stop: a Stop that came after its last step (the
    click landing while the final evaluation ran) cut nothing short, and the job, like its runs,
    is finished."""
    if not isinstance(result, dict):
        return True
    if "stopped" in result:  # demo, sequela, pretrain, sweep
        return bool(result["stopped"])
    if job.kind == "attack":
        return result.get("status") == "stopped"
    if job.kind == "defend":
        done = result.get("defended", {})
        accounted = set(done) | {x["defense"] for x in result.get("failed", []) + result.get("skipped", [])}
        return (any(d.get("status") == "stopped" for d in done.values())
                or any(name not in accounted for name in job.params.get("defenses", [])))
    return True


def _nothing_done(kind: str, result) -> str | None:
    """Why a job that returned normally still failed: every defense it was asked for failed or was
    skipped, or every sweep cell it ran failed. None when something was done."""
    if not isinstance(result, dict):
        return None
    if kind == "defend" and not result.get("defended") and (result.get("failed") or result.get("skipped")):
        nf, ns = len(result.get("failed", [])), len(result.get("skipped", []))
        return (f"no defense finished ({nf} failed, {ns} skipped; the reasons are listed with the result: "
                + ", ".join(f["defense"] for f in result.get("failed", []) + result.get("skipped", [])) + ")")
    if kind == "sweep" and not result.get("ran") and result.get("failed"):
        first = result["failed"][0]
        return (f"all {len(result['failed'])} cell(s) run failed; the first: {first.get('error')} "
                f"(cell {first.get('values')})")
    return None


__all__ = ["ACTIVE", "Job", "JobManager", "KINDS", "stage_title"]
