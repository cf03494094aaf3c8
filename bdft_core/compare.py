"""Compare defenses on one poisoned run: each registered defense (or a chosen subset) runs with its
defaults on its own copy of the poisoned model, and the result is one table row per defense: CA,
ASR, their change from the poisoned model, wall time, and what the defender needed.

This is the paper's comparative claim made checkable (Sha et al., arXiv:2212.09067: fine-tuning and
super-fine-tuning remove backdoors about as well as the dedicated defenses, at a fraction of their
cost). A defense that cannot apply to the run (a data cleanser on a transfer victim) is listed as
skipped with the reason; one that fails is listed with its error, and the others still run."""
from __future__ import annotations

import threading
import time

from .defenses import DEFENSES, build_defense
from .errors import BdftError, ConfigError
from .runs import Run, RunStore

# The order rows appear in: the paper's subjects first, then the baselines it compares against, then
# the newer ones.
PREFERRED_ORDER = ("ft", "sft", "fine_pruning", "nad", "neural_cleanse", "abl", "activation_clustering",
                   "spectral_signatures", "anp", "i_bau", "ft_sam", "fst")


def compare_names(names=None) -> list[str]:
    """Registered defenses to compare, in table order (all when ``names`` is None)."""
    if names is None:
        known = [n for n in PREFERRED_ORDER if n in DEFENSES]
        return known + [n for n in DEFENSES if n not in known]
    out = []
    for n in names:
        key = str(n).strip().lower()
        if key not in DEFENSES:
            raise ConfigError(f"unknown defense {n!r}: choose from {', '.join(DEFENSES)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError("name at least one defense to compare")
    return out


def applicable(run: Run, name: str) -> str | None:
    """None when defense ``name`` can run on ``run``, else the reason it cannot."""
    cls = DEFENSES[name]
    if cls.uses_poisoned_data and (run.kind != "attack" or run.config.get("paradigm", "standalone") != "standalone"):
        return ("needs the poisoned training set; in the transfer and encoder paradigms the victim never trains "
                "on poisoned data")
    return None


def row_of(parent: Run, d_run: Run) -> dict:
    """One comparison row from a stored defense run."""
    pc, pa = parent.final.get("clean_acc"), parent.final.get("asr")
    c, a = d_run.final.get("clean_acc"), d_run.final.get("asr")
    cls = DEFENSES.get((d_run.defense or {}).get("name", ""))
    row = {"defense": d_run.defense["name"], "title": d_run.defense.get("title") or (cls.title if cls else ""),
           "status": d_run.status, "clean_acc": c, "asr": a,
           "d_clean_acc": None if c is None or pc is None else c - pc,
           "d_asr": None if a is None or pa is None else a - pa,
           "seconds": d_run.timings.get("total_s"), "needs": d_run.defense.get("needs") or (cls.needs if cls else ""),
           "uses_poisoned_data": bool(d_run.defense.get("uses_poisoned_data")), "run_id": d_run.id}
    for k, v in d_run.final.items():  # what each defense reports of its own (precision, flagged classes, ...)
        row.setdefault(k, v)
    return row


def compare_defenses(parent: str, names=None, clean_fraction: float | None = None, store: RunStore | None = None,
                     callbacks=(), stop: threading.Event | None = None, on_stage=None, params: dict | None = None,
                     train_over: dict | None = None) -> dict:
    """Run each defense in ``names`` (all registered ones by default) with its defaults (or
    ``params[name]``) on stored run ``parent``; return the poisoned model's figures and one row per
    defense (see :func:`row_of`), plus ``skipped`` and ``failed`` lists with reasons."""
    from .pipeline import DEFAULT_CLEAN_FRACTION, run_defense

    if store is None:
        raise ConfigError("comparing defenses needs a run store (the poisoned run is loaded from it)")
    cf = DEFAULT_CLEAN_FRACTION if clean_fraction is None else clean_fraction
    names = compare_names(names)
    params = params or {}
    for n in names:
        build_defense(n, **(params.get(n) or {}))  # every setting checked before anything runs
    from .data import check_clean_fraction

    cf = check_clean_fraction(cf)  # once, not as one failure per defense
    t0 = time.perf_counter()
    run, model = store.load_model(parent)
    if run.kind not in ("attack", "victim"):
        raise ConfigError(f"run {parent} is a {run.kind} run; compare defenses on a poisoned model's run")
    out = {"run_id": run.id, "dataset": run.dataset, "attack": run.attack.get("name"),
           "paradigm": run.config.get("paradigm", "standalone"), "clean_fraction": cf,
           "poisoned": {"clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
                        "seconds": run.timings.get("total_s")},
           "rows": [], "skipped": [], "failed": []}
    setting = None
    for name in names:
        if stop is not None and stop.is_set():
            out["skipped"].append({"defense": name, "reason": "stopped before it started"})
            continue
        why = applicable(run, name)
        if why:
            out["skipped"].append({"defense": name, "reason": why})
            continue
        if on_stage:
            on_stage(name)
        try:
            if setting is None:
                from .pipeline import setting_for

                setting = setting_for(run)
            d_run, _ = run_defense(run, name, params.get(name), clean_fraction=cf, store=store, callbacks=callbacks,
                                   stop=stop, model=model, setting=setting, train_over=train_over)
        except BdftError as exc:  # one defense failing does not lose the others
            out["failed"].append({"defense": name, "error": str(exc)})
            continue
        out["rows"].append(row_of(run, d_run))
    out["seconds"] = time.perf_counter() - t0
    return out


def _finished(r: dict) -> bool:
    return r.get("status", "finished") == "finished"


def best_baseline(rows: list[dict], subjects=("ft", "sft"), poisoned_ca: float | None = None,
                  ca_drop: float = 0.1) -> dict | None:
    """The finished non-FT/SFT row with the lowest ASR (ties: the higher CA). With the poisoned
    model's clean accuracy given, rows that lost more than ``ca_drop`` of it are passed over while
    another row is left: wrecking the model also silences its backdoor. A stopped run is no result."""
    others = [r for r in rows if r["defense"] not in subjects and r.get("asr") is not None and _finished(r)]
    if poisoned_ca is not None:
        others = [r for r in others if r.get("clean_acc") is not None and r["clean_acc"] >= poisoned_ca - ca_drop] or others
    if not others:
        return None
    return min(others, key=lambda r: (round(r["asr"], 3), -(r.get("clean_acc") or 0.0)))


def verdict(result: dict, tolerance: float = 0.02, ca_tolerance: float = 0.03) -> str:
    """The paper's claim checked on this result, in one sentence: does SFT reach the best baseline's
    ASR (within ``tolerance``) at a lower cost, keeping clean accuracy (within ``ca_tolerance`` of the
    baseline's)? ``result``: ``rows`` as made by :func:`row_of`, and ``poisoned`` where known."""
    rows = {r["defense"]: r for r in result.get("rows", [])}
    sft = rows.get("sft")
    if sft is not None and not _finished(sft):
        return "SFT's newest run was stopped before its end: run it again to check the paper's claim."
    best = best_baseline(result.get("rows", []), poisoned_ca=(result.get("poisoned") or {}).get("clean_acc"))
    if sft is None or best is None or sft.get("asr") is None:
        return ("The paper claims SFT removes a backdoor as well as the stronger defenses do, at a lower cost: run "
                "SFT and at least one of them (any defense but FT) to the end to check that claim here.")

    from .figures import _known

    def took(r):
        return f"in {r['seconds']:.0f}s" if _known(r.get("seconds")) else "(time not recorded)"

    match = sft["asr"] <= best["asr"] + tolerance
    ss, bs = sft.get("seconds"), best.get("seconds")
    cheaper = ss < bs if _known(ss) and _known(bs) else None
    head = (f"SFT: ASR {100 * sft['asr']:.1f}% {took(sft)}; best baseline {best.get('title') or best['defense']}: "
            f"ASR {100 * best['asr']:.1f}% {took(best)}. ")
    sc, bc = sft.get("clean_acc"), best.get("clean_acc")
    ca_lost = sc is not None and bc is not None and sc < bc - ca_tolerance
    ca_note = (f" It keeps {100 * (bc - sc):.1f} points less clean accuracy, though, unlike the paper's claim."
               if ca_lost else "")
    if match and cheaper is None:
        return head + "SFT matches its ASR; a missing time leaves the costs uncompared." + ca_note
    if match and cheaper:
        return head + ("SFT matches it at lower cost, as the paper claims." if not ca_lost else
                       "SFT matches its ASR at lower cost." + ca_note)
    if match:
        return head + "SFT matches its ASR but is not cheaper here." + ca_note
    if cheaper:
        return head + "SFT is cheaper but leaves a higher ASR here, unlike the paper's claim."
    return head + "SFT leaves a higher ASR here, " + ("and is not cheaper, " if cheaper is False else "") + "unlike the paper's claim."


__all__ = ["PREFERRED_ORDER", "applicable", "best_baseline", "compare_defenses", "compare_names", "row_of", "verdict"]
