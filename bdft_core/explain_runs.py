"""Attribution maps for stored runs: a poisoned run and its defended children, on the same test images
(whose true class is not the backdoor's target), clean and triggered; and the pictures as PNG files.

Built on :mod:`bdft_core.explain` (Captum's Grad-CAM, Saliency, Integrated Gradients). Used by the
Explain page and ``python -m bdft_core explain``."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .runs import RunStore


def pick_images(y_test: torch.Tensor, attack, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded test indices whose true label is not the backdoor's target (ASR's population)."""
    if n < 1:
        raise ConfigError(f"pick at least one image, got {n}")
    y = y_test.cpu()
    ok = torch.nonzero(attack.target_of(y) != y).flatten()
    if len(ok) == 0:
        raise ConfigError("no test image whose true label differs from the target")
    g = torch.Generator().manual_seed(seed)
    return ok[torch.randperm(len(ok), generator=g)[: min(n, len(ok))]]


def models_of(store: RunStore, run_id: str, defended=None) -> tuple:
    """The poisoned run, and ``{label: model}`` for it and its defended children (the newest
    finished run per defense: a stopped, half-done defense is not "after the defense"; ``defended``:
    a list of defense names or child run ids to keep, None for all; a child id picks that run
    whatever its status)."""
    run, model = store.load_model(run_id)
    if run.kind not in ("attack", "victim"):
        raise ConfigError(f"run {run_id} is a {run.kind} run: explain a poisoned run (its defenses come along)")
    newest = store.newest_defenses(run_id, stopped=False)
    if defended is None:
        chosen = dict(newest)
    else:
        kids = {c["id"]: c["name"] for c in store.defenses(run_id)}
        chosen, missing = {}, []
        for d in defended:
            if d in kids:
                chosen.setdefault(kids[d], d)
            elif d in newest:
                chosen.setdefault(d, newest[d])
            else:
                missing.append(d)
        if missing:
            raise ConfigError(f"run {run_id} has no finished defended child {', '.join(missing)}; apply it in the "
                              "Defense lab or with `python -m bdft_core defend`")
    models = {"poisoned": model}
    for name, rid in chosen.items():
        models[name] = store.load_model(rid)[1]
    return run, models


def explain_run(store: RunStore, run_id: str, defended=None, n: int = 8, method: str = "gradcam", layer=None,
                seed: int = 0, target: str = "predicted") -> dict:
    """:func:`bdft_core.explain.explain_models` on the run's poisoned model and its defended children,
    for ``n`` seeded non-target test images; adds ``run_id``, ``labels`` (true classes), ``classes``."""
    from .explain import explain_models
    from .pipeline import setting_for

    t0 = time.perf_counter()
    run, models = models_of(store, run_id, defended)
    s = setting_for(run)
    idx = pick_images(s.data.y_test, s.attack, n, seed)
    x = s.data.x_test.cpu()[idx]
    out = explain_models({k: m.to(s.device) for k, m in models.items()}, x, s.attack, method=method, layer_name=layer,
                         target=target)
    out.update(run_id=run.id, labels=s.data.y_test.cpu()[idx], classes=list(s.data.classes),
               target_class=run.attack.get("target"), seconds=time.perf_counter() - t0)
    return out


def panel(result: dict, model: str, scale: int = 4) -> np.ndarray:
    """One model's picture: row 1 the clean images with their maps over them, row 2 the triggered
    images with theirs; uint8 (2*H*scale, N*W*scale, 3)."""
    from .explain import overlay

    m = result["models"][model]
    rows = []
    for xs, maps in ((result["x_clean"], m["maps_clean"]), (result["x_triggered"], m["maps_triggered"])):
        tiles = [overlay(x, h) for x, h in zip(xs, maps)]
        rows.append(np.concatenate(tiles, axis=1))
    img = np.concatenate(rows, axis=0)
    return img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img


def summary(result: dict) -> list[dict]:
    """One JSON-ready row per model: the mean trigger-region share (clean, triggered), map shift,
    centre shift (pixels), share of predictions the trigger flipped, seconds."""
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in result["rows"]]


def write_images(result: dict, out_dir: str | Path, scale: int = 4, prefix: str | None = None) -> list[str]:
    """Each model's :func:`panel` as ``<out_dir>/<prefix>_<method>_<model>.png`` (prefix: the run id
    unless given); returns the paths."""
    from PIL import Image

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in result["models"]:
        p = out / f"{prefix or result.get('run_id', 'run')}_{result['method']}_{name}.png"
        Image.fromarray(panel(result, name, scale)).save(p)
        paths.append(str(p))
    return paths


__all__ = ["explain_run", "models_of", "panel", "pick_images", "summary", "write_images"]
