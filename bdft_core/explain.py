"""Attribution maps: where in the image does a model look, and does a trigger move that?

A backdoored model that answers the target class on a triggered image usually does so *because of the
trigger*: an attribution map of the triggered prediction piles its mass onto the patch, while the clean
prediction's map sits on the object. A defense that removed the backdoor should undo that shift. This
module computes such maps with Captum (Kokhlikyan et al., "Captum: A unified and generic model
interpretability library for PyTorch", arXiv:2009.07896, 2020) and measures them.

Methods (one verb each, ``Method(model, layer).attribute(x_float, target) -> (N, H, W)``, non-negative,
at the input's resolution):

- ``gradcam``: Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV 2017, arXiv:1610.02391) on a convolutional layer, rectified
  (``relu_attributions=True``) and upsampled bilinearly to the input size;
- ``saliency``: the absolute input gradient (Simonyan, Vedaldi and Zisserman, "Deep Inside
  Convolutional Networks", ICLR workshop 2014, arXiv:1312.6034), summed over channels;
- ``integrated_gradients``: Integrated Gradients from a black image (Sundararajan, Taly and Yan,
  "Axiomatic Attribution for Deep Networks", ICML 2017, arXiv:1703.01365), absolute, summed over
  channels.

Metrics: :func:`region_share` (share of a map's mass inside the trigger region, for patch triggers),
:func:`map_shift` (1 - cosine similarity of the clean and triggered maps) and :func:`center_shift`
(distance between their centres of mass, in pixels). :func:`explain_models` runs a method on several
models (say a poisoned one and its defended child) on clean and triggered images and gathers all of it
for a dashboard page or the command line; :func:`overlay` draws a map over an image (numpy only).

Images: uint8 (N, C, H, W) at the API's edge (:func:`attribute`, :func:`explain_models`), float in
[0, 1] inside the method classes, like the models themselves. Everything runs in float32, in eval mode
(each module's training flag is restored afterwards), with gradients taken by ``torch.autograd.grad``
(no parameter's ``.grad`` is touched), on the model's device.

Needs: the model and a few images (clean ones, plus the attack to trigger them); no training data.
Captum is imported on first use, so importing this module stays cheap.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

REGION_MAX_SHARE = 0.25  # a trigger mask covering at least this share of the pixels is a blend, not a region


# -- helpers -------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration, then every module's own training flag back as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


@contextmanager
def _grad_on():
    """Gradients on, even when called from ``torch.no_grad()`` / ``inference_mode()`` code."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float [0, 1]; float images are taken as they are (in [0, 1])."""
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ConfigError(f"images must be a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    return xf.to(device).clone()


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


# -- layers --------------------------------------------------------------------------------------
def _conv_outputs(model: nn.Module, image_shape) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """Every convolution or conv-containing module (not the model itself) with a 4-D output, with its
    output (h, w), in the order the outputs are computed; 1x1 outputs included."""
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ConfigError(f"image_shape must be (C, H, W), got {image_shape}")
    cands = {id(m): (n, m) for n, m in model.named_modules() if n and _has_conv(m)}
    found: list[tuple[str, nn.Module, tuple[int, int]]] = []
    seen: set[int] = set()

    def hook(mod, _inp, out):
        if id(mod) in seen or not isinstance(out, torch.Tensor) or out.ndim != 4:
            return
        seen.add(id(mod))
        found.append((cands[id(mod)][0], mod, (int(out.shape[-2]), int(out.shape[-1]))))

    handles = [m.register_forward_hook(hook) for _, m in cands.values()]
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *image_shape), device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return found


def _image_shape(model: nn.Module, image_shape) -> tuple[int, int, int] | None:
    if image_shape is None:
        conv = _first_conv(model)
        return None if conv is None else (conv.in_channels, 32, 32)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        conv = _first_conv(model)
        shape = ((conv.in_channels if conv is not None else 3), *shape)
    return shape  # type: ignore[return-value]


def conv_layers(model: nn.Module, image_shape=None) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """The model's convolution-like layers that output spatial maps, in the order their outputs are
    computed: every ``nn.Conv2d`` and every module that contains one (a block, a stage), except the
    model itself, whose output is a 4-D tensor (N, C, h, w) with ``h * w > 1``. Each comes as
    ``(name, module, (h, w))``, the output size measured by one forward pass (eval mode, no grad) on a
    black dummy image of ``image_shape`` (C, H, W) or (H, W); by default (C of the first convolution,
    32, 32).

    For fastnet on 32x32 input: the whitening conv (31x31), then each block (16x16, 8x8, 4x4) after its
    inner convolutions; a layer listed after another was computed later (deeper)."""
    shape = _image_shape(model, image_shape)
    if shape is None:
        return []
    return [t for t in _conv_outputs(model, shape) if t[2][0] * t[2][1] > 1]


def default_layer(model: nn.Module, image_shape, min_size: int | None = None) -> str:
    """The Grad-CAM layer used when none is named. The rule: among the *outermost* listed layers of
    :func:`conv_layers` (the stages: a convolution or block not nested inside another listed block),
    the deepest whose output is at least ``min_size`` x ``min_size``, where ``min_size`` defaults to
    ``ceil(min(H, W) / 4)`` (8 for 32x32 input): one map cell then spans at most 4x4 input pixels, fine
    enough to localise a 3x3 patch. When no stage is that large, the stage with the largest output
    (the deepest among equals). Deeper layers carry more semantic channels, shallower ones sharper maps;
    this picks the deepest that still localises. fastnet 32x32 -> ``body.3`` (8x8, the second block);
    resnet18 32x32 -> ``body.6`` (8x8, the last block of the third stage)."""
    shape = _image_shape(model, image_shape)
    outs = _conv_outputs(model, shape) if shape is not None else []
    names = [n for n, _, _ in outs]  # nesting is judged among all 4-D outputs, 1x1 ones included
    stages = [t for t in outs if t[2][0] * t[2][1] > 1
              and not any(t[0].startswith(o + ".") for o in names if o != t[0])]
    if not stages:
        raise ConfigError("this model has no convolutional layer with a spatial output, so Grad-CAM has "
                          "nothing to work on; use 'saliency' or 'integrated_gradients'")
    need = int(min_size) if min_size is not None else max(1, math.ceil(min(shape[1:]) / 4))
    big = [t for t in stages if min(t[2]) >= need]
    if big:
        return big[-1][0]
    best = max(min(t[2]) for t in stages)
    return [t for t in stages if min(t[2]) == best][-1][0]


def _resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    if isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise ConfigError("the layer given is not a module of this model")
        return name, layer
    mods = dict(model.named_modules())
    if layer not in mods or layer == "":
        options = ", ".join(n for n, _, _ in conv_layers(model)) or "none"
        raise ConfigError(f"this model has no layer {layer!r}; convolutional layers: {options}")
    return str(layer), mods[layer]


def _targets(model: nn.Module, x: torch.Tensor, target, batch: int = 256) -> torch.Tensor:
    """Per-image class indices (N,) on x's device: the prediction for ``None``, else an int or (N,)."""
    n = len(x)
    if target is None:
        with _eval_mode(model), torch.no_grad():
            return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, n, batch)]) if n else \
                torch.zeros(0, dtype=torch.long, device=x.device)
    t = torch.as_tensor(target, dtype=torch.long, device=x.device)
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ConfigError(f"target must be a class index or one per image ({n}), got shape {tuple(t.shape)}")
    return t


# -- methods -------------------------------------------------------------------------------------
class Explainer:
    """One attribution method bound to a model (and, for layer methods, a layer). ``attribute(x, target)``
    takes float images in [0, 1] (N, C, H, W) and class indices (an int, (N,), or None for the model's
    prediction) and returns non-negative maps (N, H, W), float32, on the model's device, detached."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_layer: ClassVar[bool] = False
    help: ClassVar[str] = ""

    def __init__(self, model: nn.Module, layer=None, batch: int = 64):
        self.model = model
        self.batch = max(1, int(batch))
        self.layer_name: str | None = None
        self.layer: nn.Module | None = None
        if self.uses_layer:
            name, mod = _resolve_layer(model, layer) if layer is not None else (None, None)
            self.layer_name, self.layer = name, mod

    def attribute(self, x: torch.Tensor, target=None) -> torch.Tensor:
        dev = model_device(self.model)
        xf = _as_float(x, dev)
        if self.uses_layer and self.layer is None:
            self.layer_name, self.layer = _resolve_layer(self.model, default_layer(self.model, xf.shape[1:]))
        with _eval_mode(self.model), _grad_on():
            t = _targets(self.model, xf, target)
            out = [self._maps(xf[i:i + self.batch].clone().requires_grad_(True), t[i:i + self.batch])
                   for i in range(0, len(xf), self.batch)]
        if not out:
            return torch.zeros((0, *xf.shape[2:]), device=dev)
        return torch.cat(out).detach().float().clamp_min_(0.0)

    def _maps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GradCAM(Explainer):
    """Grad-CAM on ``layer`` (a name or module; default :func:`default_layer`): each channel of the
    layer's output weighted by its spatially averaged gradient, summed over channels, rectified, then
    upsampled bilinearly to the input size (``captum.attr.LayerGradCam`` +
    ``LayerAttribution.interpolate``)."""

    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017, Grad-CAM, ICCV, arXiv:1610.02391"
    uses_layer = True
    help = "class-weighted activations of a convolutional layer, upsampled: coarse, robust"

    def _maps(self, x, t):
        from captum.attr import LayerAttribution, LayerGradCam

        cam = LayerGradCam(self.model, self.layer).attribute(x, target=t, relu_attributions=True)
        if cam.ndim != 4:
            raise ConfigError(f"Grad-CAM needs a layer with a spatial output (N, C, H, W); layer "
                              f"{self.layer_name!r} gives shape {tuple(cam.shape)}")
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
        return cam[:, 0]


class Saliency(Explainer):
    """|d logit / d pixel|, summed over colour channels (``captum.attr.Saliency``)."""

    name = "saliency"
    title = "Saliency (input gradient)"
    paper = "Simonyan et al. 2014, Deep Inside Convolutional Networks, arXiv:1312.6034"
    help = "absolute input gradient: pixel-sharp, noisy"

    def _maps(self, x, t):
        from captum.attr import Saliency as _Saliency

        return _Saliency(self.model).attribute(x, target=t, abs=True).sum(1)


class IntegratedGradients(Explainer):
    """Integrated Gradients from a black image in ``n_steps`` (Gauss-Legendre) steps, absolute value
    summed over colour channels (``captum.attr.IntegratedGradients``). Costs ``n_steps`` gradient
    passes per image: about 0.1 s per CIFAR-10 image for fastnet on one CPU thread at 32 steps, some
    25 times Grad-CAM or saliency."""

    name = "integrated_gradients"
    title = "Integrated Gradients"
    paper = "Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks, ICML, arXiv:1703.01365"
    help = "gradients integrated along a path from a black image: pixel-sharp, complete, slower"

    def __init__(self, model, layer=None, batch: int = 64, n_steps: int = 32):
        super().__init__(model, layer, batch)
        if int(n_steps) < 1:
            raise ConfigError(f"integrated gradients needs at least 1 step, got {n_steps}")
        self.n_steps = int(n_steps)

    def _maps(self, x, t):
        from captum.attr import IntegratedGradients as _IG

        ig = _IG(self.model).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=self.n_steps,
                                       internal_batch_size=self.batch * 8)
        return ig.abs().sum(1)


METHODS: dict[str, type[Explainer]] = {c.name: c for c in (GradCAM, Saliency, IntegratedGradients)}


def method_names() -> list[str]:
    return list(METHODS)


def _method(name: str) -> type[Explainer]:
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ConfigError(f"unknown attribution method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[key]


def attribute(model: nn.Module, x_uint8: torch.Tensor, method: str = "gradcam", target=None, layer=None,
              **kw) -> torch.Tensor:
    """Maps (N, H, W), non-negative float32 on the model's device, of ``method`` for images ``x_uint8``
    (uint8 (N, C, H, W); float in [0, 1] is accepted too) and class ``target`` (None: each image's
    predicted class; an int; or (N,)). ``layer`` (a name or module) is for Grad-CAM only (None:
    :func:`default_layer`); ``kw`` goes to the method (``batch``, ``n_steps``)."""
    return _method(method)(model, layer, **kw).attribute(x_uint8, target)


# -- metrics -------------------------------------------------------------------------------------
def _maps3(maps) -> torch.Tensor:
    m = torch.as_tensor(maps).float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ConfigError(f"maps must be (N, H, W) or (H, W), got shape {tuple(m.shape)}")
    return m


def region_share(maps, mask) -> torch.Tensor:
    """Share of each map's attribution mass inside ``mask`` (H, W; bool or weights in [0, 1]):
    ``sum(map * mask) / sum(map)``, in [0, 1] for non-negative maps; 0 where a map sums to 0. (N,)"""
    m = _maps3(maps)
    k = torch.as_tensor(mask).to(m.device).float()
    if k.shape != m.shape[1:]:
        raise ConfigError(f"region mask {tuple(k.shape)} does not match the maps' size {tuple(m.shape[1:])}")
    tot = m.sum((1, 2))
    ins = (m * k).sum((1, 2))
    return torch.where(tot > 0, ins / tot.clamp_min(1e-30), torch.zeros_like(tot))


def map_shift(maps_clean, maps_triggered) -> torch.Tensor:
    """How much each map changed shape: ``1 - cos(a, b)`` of the flattened maps (cosine is scale-free,
    so normalising each map to unit mass first changes nothing). 0: the same pattern; 1: disjoint
    supports (non-negative maps keep it in [0, 1]). A pair of all-zero maps counts 0 (nothing moved),
    one all-zero map against a non-zero one counts 1. (N,)"""
    a, b = _maps3(maps_clean), _maps3(maps_triggered)
    if a.shape != b.shape:
        raise ConfigError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.flatten(1), b.to(a.device).flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-30)
    shift = (1.0 - cos).clamp(0.0, 2.0)
    zero_a, zero_b = na == 0, nb == 0
    shift = torch.where(zero_a & zero_b, torch.zeros_like(shift), shift)
    return torch.where(zero_a ^ zero_b, torch.ones_like(shift), shift)


def center_of_mass(maps) -> torch.Tensor:
    """Each map's centre of mass as (row, col) in pixel coordinates (pixel centres at 0..H-1); NaN for
    an all-zero map. (N, 2)"""
    m = _maps3(maps)
    _, h, w = m.shape
    tot = m.sum((1, 2))
    rows = torch.arange(h, dtype=m.dtype, device=m.device)
    cols = torch.arange(w, dtype=m.dtype, device=m.device)
    r = (m.sum(2) * rows).sum(1) / tot
    c = (m.sum(1) * cols).sum(1) / tot
    com = torch.stack([r, c], 1)
    return torch.where((tot > 0)[:, None], com, torch.full_like(com, float("nan")))


def center_shift(maps_clean, maps_triggered) -> torch.Tensor:
    """Euclidean distance in pixels between the two maps' centres of mass; NaN where either map is all
    zero. (N,)"""
    a, b = center_of_mass(maps_clean), center_of_mass(maps_triggered)
    return (a - b.to(a.device)).norm(dim=1)


def trigger_region(attack, image_shape) -> torch.Tensor | None:
    """Where a patch trigger sits, as a bool (H, W) mask, or None when the attack has no fixed region.
    For attacks with a fixed ``mask`` tensor (``x * (1 - mask) + pattern * mask``: BadNets, Blended), the
    region is ``mask > 0`` (any channel) when it covers less than 25% of the pixels; a mask covering
    more is a blend over the whole image (Blended: every pixel), which has no region. Attacks without a
    fixed mask (WaNet, SIG, per-image generators) give None. ``image_shape``: (C, H, W) or (H, W)."""
    mask = getattr(attack, "mask", None)
    if not isinstance(mask, torch.Tensor):
        return None
    size = tuple(int(s) for s in image_shape)[-2:]
    m = mask.detach().float().cpu()
    m = m.reshape(-1, *m.shape[-2:]) if m.ndim >= 2 else m
    if m.ndim != 3 or tuple(m.shape[-2:]) != size:
        raise ConfigError(f"the attack's mask {tuple(mask.shape)} does not match the image size {size}")
    region = (m > 0).any(0)
    if float(region.float().mean()) >= REGION_MAX_SHARE:
        return None
    return region


# -- a comparison over models --------------------------------------------------------------------
def _mean(v: torch.Tensor | None) -> float | None:
    if v is None:
        return None
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else None


def explain_models(models: dict[str, nn.Module], x_uint8_clean: torch.Tensor, attack, method: str = "gradcam",
                   layer_name: str | None = None, target="predicted", **kw) -> dict[str, Any]:
    """Attribution maps of each model on clean images and on the same images with the trigger, and
    how they compare. The triggered images are ``attack.apply_uint8(x)`` (the float trigger, rounded
    to uint8 exactly as the ASR test set is). ``target``: "predicted" (each map explains that image's
    own prediction: the clean class on clean images, typically the backdoor target on triggered ones),
    "backdoor" (the class the backdoor aims at, ``attack.target_of`` of the clean prediction, on both),
    or an int class. ``layer_name``: Grad-CAM layer (None: :func:`default_layer` per model).

    Returns a dict (tensors on the CPU)::

        method, method_title, target, attack (name), n, image_shape (C, H, W),
        x_clean, x_triggered       uint8 (N, C, H, W)
        region                     bool (H, W) trigger region, or None (no patch region)
        region_area                share of the pixels in the region (the share a uniform map would
                                   give it: the chance level for share_*), or None
        models: {name: {
            layer, layer_size      Grad-CAM layer name and its (h, w); None for pixel methods
            pred_clean, pred_triggered     (N,) predicted classes
            target_clean, target_triggered (N,) the classes explained
            maps_clean, maps_triggered     float (N, H, W), non-negative
            share_clean, share_triggered   (N,) region_share, or None without a region
            map_shift, center_shift        (N,) see map_shift / center_shift
            mean: {share_clean, share_triggered, map_shift, center_shift, flip_rate}  floats (None if
                  not defined); flip_rate = share of images whose prediction the trigger changed
            seconds}}
        rows                       one flat dict per model (model, layer, the means, seconds): a table
    """
    if not models:
        raise ConfigError("explain_models needs at least one model")
    cls = _method(method)
    x = torch.as_tensor(x_uint8_clean)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ConfigError(f"clean images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if not (target in ("predicted", "backdoor") or isinstance(target, (int, np.integer))):
        raise ConfigError(f"target must be 'predicted', 'backdoor' or a class index, got {target!r}")
    x = x.cpu()
    x_bd = attack.apply_uint8(x)
    region = trigger_region(attack, x.shape[1:])
    out: dict[str, Any] = {"method": cls.name, "method_title": cls.title, "target": target,
                           "attack": getattr(attack, "name", type(attack).__name__), "n": len(x),
                           "image_shape": tuple(x.shape[1:]), "x_clean": x, "x_triggered": x_bd,
                           "region": region, "region_area": None if region is None else float(region.float().mean()),
                           "models": {}, "rows": []}
    for mname, model in models.items():
        t0 = time.perf_counter()
        dev = model_device(model)
        xc, xt = _as_float(x, dev), _as_float(x_bd, dev)
        pc, pt = _targets(model, xc, None), _targets(model, xt, None)
        if target == "predicted":
            tc, tt = pc, pt
        elif target == "backdoor":
            tc = tt = attack.target_of(pc)
        else:
            tc = tt = torch.full_like(pc, int(target))
        layer = None
        if cls.uses_layer:
            layer = layer_name if layer_name is not None else default_layer(model, x.shape[1:])
        ex = cls(model, layer, **kw)
        mc, mt = ex.attribute(xc, tc).cpu(), ex.attribute(xt, tt).cpu()
        sc = region_share(mc, region) if region is not None else None
        st = region_share(mt, region) if region is not None else None
        ms, cs = map_shift(mc, mt), center_shift(mc, mt)
        layer_size = None
        if ex.layer is not None:
            layer_size = next((s for n, _, s in conv_layers(model, x.shape[1:]) if n == ex.layer_name), None)
        flips = (pc != pt).float().cpu()
        mean = {"share_clean": _mean(sc), "share_triggered": _mean(st), "map_shift": _mean(ms),
                "center_shift": _mean(cs), "flip_rate": _mean(flips)}
        sec = time.perf_counter() - t0
        out["models"][mname] = {"layer": ex.layer_name, "layer_size": layer_size, "pred_clean": pc.cpu(),
                                "pred_triggered": pt.cpu(), "target_clean": tc.cpu(), "target_triggered": tt.cpu(),
                                "maps_clean": mc, "maps_triggered": mt, "share_clean": sc, "share_triggered": st,
                                "map_shift": ms, "center_shift": cs, "mean": mean, "seconds": sec}
        out["rows"].append({"model": mname, "layer": ex.layer_name, **mean, "seconds": sec})
    return out


# -- drawing -------------------------------------------------------------------------------------
def heat_colors(v: np.ndarray) -> np.ndarray:
    """A red-yellow colour map: values in [0, 1] -> float RGB in [0, 1] (..., 3); 0 is dark red,
    0.5 red, 1 yellow."""
    v = np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0)
    r = np.clip(0.4 + 1.2 * v, 0.0, 1.0)
    g = np.clip(2.0 * v - 1.0, 0.0, 1.0)
    return np.stack([r, g, np.zeros_like(v)], -1)


def overlay(img_uint8, heat, alpha: float = 0.6) -> np.ndarray:
    """A heat map drawn over an image: ``img_uint8`` (C, H, W) with C = 1 or 3 (tensor or array),
    ``heat`` (H, W) non-negative (resized bilinearly if its size differs) -> uint8 (H, W, 3). The map is
    scaled by its maximum; each pixel mixes image and colour with weight ``alpha * value``, so where the
    map is 0 the image shows unchanged."""
    img = torch.as_tensor(np.asarray(img_uint8) if not isinstance(img_uint8, torch.Tensor) else img_uint8)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ConfigError(f"overlay needs an image (C, H, W) with 1 or 3 channels, got {tuple(img.shape)}")
    imgf = img.detach().cpu().float()
    imgf = imgf / 255.0 if img.dtype == torch.uint8 else imgf
    imgf = imgf.expand(3, -1, -1) if imgf.shape[0] == 1 else imgf
    h = torch.as_tensor(np.asarray(heat) if not isinstance(heat, torch.Tensor) else heat).detach().cpu().float()
    if h.ndim != 2:
        raise ConfigError(f"overlay needs a map (H, W), got shape {tuple(h.shape)}")
    if tuple(h.shape) != tuple(imgf.shape[1:]):
        h = F.interpolate(h[None, None], size=tuple(imgf.shape[1:]), mode="bilinear", align_corners=False)[0, 0]
    h = h.clamp_min(0.0)
    top = float(h.max())
    v = (h / top).numpy() if top > 0 else np.zeros(tuple(h.shape), np.float32)
    base = imgf.permute(1, 2, 0).numpy().clip(0.0, 1.0)
    wgt = float(alpha) * v[..., None]
    out = base * (1.0 - wgt) + heat_colors(v) * wgt
    return (out * 255.0).round().clip(0, 255).astype(np.uint8)


__all__ = ["METHODS", "Explainer", "GradCAM", "IntegratedGradients", "Saliency", "attribute", "center_of_mass",
           "center_shift", "conv_layers", "default_layer", "explain_models", "heat_colors", "map_shift",
           "method_names", "model_device", "overlay", "region_share", "trigger_region"]
