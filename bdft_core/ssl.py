"""The encoder-based paradigm: self-supervised contrastive pretraining (SimCLR), linear probes, and
the BadEncoder attack on a pretrained encoder.

- SimCLR: Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive Learning of
  Visual Representations", ICML 2020 (arXiv:2002.05709). Two random augmentations of each image,
  an encoder plus a projection MLP, and the NT-Xent loss over the 2N views of a batch.
- BadEncoder: Jia, Liu and Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in
  Self-Supervised Learning", IEEE S&P 2022 (arXiv:2108.00352). The attacker fine-tunes a clean
  encoder so that triggered inputs embed like a few reference images of the downstream target class,
  while clean inputs keep their clean-encoder embeddings; any downstream classifier built on the
  backdoored encoder then inherits the backdoor.

The encoder is any :class:`~bdft_core.models.BackdoorModel`: ``model.features`` (image in [0, 1] ->
embedding) is the encoder, ``model.classifier`` the downstream head. As in :mod:`bdft_core.train`,
data stays on the device as uint8 tensors and augmentation is batched there (no PIL, no
DataLoader); steps run under bf16 autocast where :func:`bdft_core.device.amp_dtype` says so, in
channels-last layout. Progress goes to ``callbacks``, a sequence of ``(event, fn)`` pairs with
events "on_batch" (after every step) and "on_epoch_end", each receiving a
:class:`bdft_core.train.Progress`; setting the ``stop`` event ends training after the current step.
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .device import amp_dtype as pick_amp
from .errors import CheckpointError, ConfigError
from .metrics import autocast_ctx
from .train import Progress, batch_indices

ENCODER_ASSET = "encoder_cifar10.safetensors"
EVENTS = ("on_batch", "on_epoch_end")


def default_encoder_path() -> Path:
    """Where the shipped clean CIFAR-10 encoder lives: ``<repo>/assets/encoder_cifar10.safetensors``."""
    return Path(__file__).resolve().parents[1] / "assets" / ENCODER_ASSET


# --------------------------------------------------------------------------------------------
# Batched SimCLR augmentation
# --------------------------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float (N, 3, H, W) -> (N, 1, H, W); single-channel images pass through."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def simclr_augment(x: torch.Tensor, generator: torch.Generator | None = None, scale=(0.2, 1.0),
                   ratio=(3 / 4, 4 / 3), flip: float = 0.5, jitter: float = 0.4, p_jitter: float = 0.8,
                   p_gray: float = 0.2) -> torch.Tensor:
    """One SimCLR view of every image of a batch, at once, on the batch's device.

    ``x``: uint8 (or float in [0, 1]) (N, C, H, W). Returns float (N, C, H, W) in [0, 1]:

    - random resized crop: area share ``U(scale)``, aspect ratio log-uniform in ``ratio``, a random
      position inside the image, resized back to H x W (bilinear, via ``affine_grid``/``grid_sample``);
    - horizontal flip with probability ``flip`` (folded into the same affine map);
    - with probability ``p_jitter``, colour jitter: brightness, contrast and saturation factors each
      uniform in ``[1 - jitter, 1 + jitter]``, applied in that order (SimCLR's CIFAR recipe without
      the hue shift);
    - grayscale with probability ``p_gray``.

    All randomness comes from ``generator`` (which must live on ``x``'s device), so a seed fixes the
    views."""
    n, c, h, w = x.shape
    dev = x.device
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    if n == 0:
        return xf

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=generator)

    # random resized crop + flip: output pixel (u, v) in [-1, 1]^2 samples input (sx*u + tx, sy*v + ty)
    area = scale[0] + (scale[1] - scale[0]) * rand(n)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a share of the image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    tx = (2 * rand(n) - 1) * (1 - cw)  # crop centre, keeping the crop inside the image
    ty = (2 * rand(n) - 1) * (1 - ch)
    sign = torch.where(rand(n) < flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cw * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # colour jitter (brightness, contrast, saturation), applied to a random share p_jitter of images
    if jitter > 0 and p_jitter > 0:
        on = (rand(n) < p_jitter).float().view(n, 1, 1, 1)
        b, ct, s = (1 + jitter * (2 * rand(3, n, 1, 1, 1) - 1)).unbind(0)
        b, ct, s = (on * v + (1 - on) for v in (b, ct, s))  # factor 1 where jitter is off
        out = (out * b).clamp_(0, 1)
        m = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - m) * ct + m).clamp_(0, 1)
        if c == 3:
            g = _gray(out)
            out = ((out - g) * s + g).clamp_(0, 1)
    if p_gray > 0 and c == 3:
        gm = (rand(n) < p_gray).view(n, 1, 1, 1)
        out = torch.where(gm, _gray(out).expand(n, c, h, w), out)
    return out.clamp_(0, 1)


# --------------------------------------------------------------------------------------------
# NT-Xent and the projection head
# --------------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy over the 2N views (Chen et al. 2020, eq. 1).

    Rows of ``z1`` and ``z2`` (N, D) are the two views of the same N images. With unit vectors
    ``u`` (the 2N rows, L2-normalised) and ``s_ij = u_i . u_j / temperature``, the loss of view i
    whose positive is j is ``-log(exp(s_ij) / sum_{k != i} exp(s_ik))``; the result is the mean over
    all 2N views."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ConfigError(f"nt_xent needs two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP g: Linear -> BN -> ReLU -> Linear (the loss is computed on g(h);
    the encoder output h is what downstream tasks use)."""

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, h):
        return self.net(h)


def feature_dim(model) -> int:
    """Width of ``model.features``' output (the classifier's input)."""
    return int(model.classifier.in_features)


# --------------------------------------------------------------------------------------------
# Shared training-loop pieces
# --------------------------------------------------------------------------------------------

def _callbacks(callbacks: Iterable) -> dict[str, list[Callable[[Progress], None]]]:
    out: dict[str, list] = {e: [] for e in EVENTS}
    for item in callbacks or ():
        try:
            event, fn = item
        except (TypeError, ValueError):
            raise ConfigError("callbacks must be (event, function) pairs") from None
        if event not in EVENTS:
            if event == "on_step":  # the Trainer's evaluation event: nothing is evaluated here
                continue
            raise ConfigError(f"unknown callback event {event!r}: use 'on_batch' or 'on_epoch_end'")
        out[event].append(fn)
    return out


def warmup_cosine(step: int, total: int, peak: float, warmup: float = 0.1, final: float = 0.0) -> float:
    """Linear warmup over the first ``warmup`` share of steps, then cosine decay to ``final * peak``."""
    wsteps = max(1, int(round(warmup * total)))
    if step < wsteps:
        return peak * (step + 1) / wsteps
    u = (step - wsteps) / max(1, total - wsteps)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, u))))


def _check_common(epochs, batch_size, lr):
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ConfigError(f"epochs must be a positive number, got {epochs}")
    if int(batch_size) < 2:
        raise ConfigError(f"batch size must be at least 2, got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")


def _as_float(xb: torch.Tensor, channels_last: bool) -> torch.Tensor:
    xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
    return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb


# --------------------------------------------------------------------------------------------
# SimCLR pretraining
# --------------------------------------------------------------------------------------------

def pretrain_simclr(model, x_uint8: torch.Tensor, epochs: float = 20, batch_size: int = 512, lr: float = 0.6,
                    temperature: float = 0.2, seed: int = 0, callbacks=(), stop: threading.Event | None = None,
                    weight_decay: float = 5e-4, warmup: float = 0.05, proj_hidden: int = 256, proj_dim: int = 128,
                    amp: str = "auto", channels_last: bool = True) -> tuple[ProjectionHead, list[dict]]:
    """Contrastive pretraining of ``model.features`` on unlabeled uint8 images (SimCLR, Chen et al.
    ICML 2020), in place.

    Call ``model.fit_data(x)`` first (input statistics, whitening). Each step draws a batch, makes
    two views with :func:`simclr_augment`, and minimises :func:`nt_xent` of the projection head's
    outputs. Optimiser: SGD with momentum 0.9 (Nesterov) and weight decay on encoder and head, the
    learning rate warmed up linearly over ``warmup`` of the steps and then decayed on a cosine to 0
    (plain SGD works at these small batch sizes; LARS matters only for very large batches).
    ``model.classifier`` is untouched.

    Returns ``(projection_head, history)``; history has one row per epoch (step, epoch, loss, lr,
    elapsed_s, images_per_s), plus a last row if stopped in the middle of an epoch."""
    _check_common(epochs, batch_size, lr)
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    n = len(x_uint8)
    if n < 2:
        raise ConfigError("SimCLR needs at least 2 images")
    cbs = _callbacks(callbacks)
    stop = stop or threading.Event()
    dev = next(model.parameters()).device
    x_uint8 = x_uint8.to(dev)
    amp_dt = pick_amp(dev, amp)
    torch.manual_seed(seed)
    head = ProjectionHead(feature_dim(model), proj_hidden, proj_dim).to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bs = min(int(batch_size), n)
    steps_per_epoch = n // bs if n >= bs else 1  # drop the last partial batch (BN and NT-Xent want full batches)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=warmup_cosine(0, total, lr, warmup), momentum=0.9, nesterov=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    history: list[dict] = []
    model.train()
    head.train()
    t0 = time.perf_counter()
    step, seen = 0, 0
    loss_sum, loss_n = torch.zeros((), device=dev), 0

    def progress(event, loss):
        el = time.perf_counter() - t0
        return Progress(event, step, total, step / steps_per_epoch, loss, opt.param_groups[0]["lr"], el,
                        seen / el if el > 0 else 0.0)

    def epoch_row(event):
        nonlocal loss_sum, loss_n
        p = progress(event, (loss_sum / max(1, loss_n)).item() if loss_n else float("nan"))
        history.append({"step": p.step, "epoch": p.epoch, "loss": p.loss, "lr": p.lr, "elapsed_s": p.elapsed_s,
                        "images_per_s": p.images_per_s})
        loss_sum.zero_()
        loss_n = 0
        for fn in cbs["on_epoch_end"]:
            fn(p)

    while step < total and not stop.is_set():
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, steps_per_epoch * bs, bs):
            if step >= total or stop.is_set():
                break
            xb = x_uint8[perm[i:i + bs]]
            v = torch.cat([simclr_augment(xb, gen), simclr_augment(xb, gen)], 0)
            v = _as_float(v, channels_last)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total, lr, warmup)
            with autocast_ctx(dev, amp_dt):
                z = head(model.features(v))
            z1, z2 = z.float().chunk(2, 0)
            loss = nt_xent(z1, z2, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(xb)
            loss_sum += loss.detach()
            loss_n += 1
            if cbs["on_batch"]:
                p = progress("batch", float(loss.detach()))
                for fn in cbs["on_batch"]:
                    fn(p)
            if step % steps_per_epoch == 0 or step == total:
                epoch_row("epoch")
    if loss_n:  # stopped in the middle of an epoch
        epoch_row("stop")
    model.eval()
    head.eval()
    return head, history


# --------------------------------------------------------------------------------------------
# Features and linear probes
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(model, x: torch.Tensor, batch: int = 1024, amp: str = "auto", channels_last: bool = True,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``model.features`` of uint8 (or float [0, 1]) images, in eval mode, in batches; float32 (N, D)
    on the model's device. ``transform`` (float [0, 1] batch -> batch), if given, is applied first
    (e.g. an attack's trigger)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    amp_dt = pick_amp(dev, amp)
    out = []
    try:
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(dev)
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            if transform is not None:
                xb = transform(xb)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(dev, amp_dt):
                out.append(model.features(xb).float())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, feature_dim(model), device=dev)


def fit_linear(f_train: torch.Tensor, y_train: torch.Tensor, num_classes: int | None = None, epochs: int = 30,
               lr: float = 1e-2, weight_decay: float = 1e-5, batch_size: int = 512, seed: int = 0) -> nn.Linear:
    """A linear classifier on fixed features: standardise the features (train statistics), train
    with Adam and a cosine-decayed rate, then fold the standardisation into the weights, so the
    returned ``nn.Linear`` takes raw features (and can serve as ``model.classifier``)."""
    if len(y_train) == 0:
        raise ConfigError("no training features for the linear probe")
    f = f_train.float()
    y = y_train.to(f.device).long()
    k = int(num_classes or int(y.max()) + 1)
    mu = f.mean(0)
    sd = f.std(0).clamp_min(1e-6) if len(f) > 1 else torch.ones_like(mu)
    fs = (f - mu) / sd
    g = torch.Generator(device=f.device).manual_seed(seed)
    lin = nn.Linear(f.shape[1], k).to(f.device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(y)
    bs = min(int(batch_size), n)
    spe = math.ceil(n / bs)
    total = max(1, int(epochs) * spe)
    step = 0
    with torch.enable_grad():
        for _ in range(int(epochs)):
            perm = torch.randperm(n, device=f.device, generator=g)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                for gr in opt.param_groups:
                    gr["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(lin(fs[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():  # W (f - mu) / sd + b  ==  (W / sd) f + (b - W mu / sd)
        w = lin.weight / sd
        lin.bias.sub_(w @ mu)
        lin.weight.copy_(w)
    return lin


def linear_probe(model, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor | None = None,
                 y_test: torch.Tensor | None = None, epochs: int = 30, seed: int = 0, num_classes: int | None = None,
                 lr: float = 1e-2, batch: int = 1024) -> dict:
    """Linear evaluation of a frozen encoder: extract ``model.features`` of all images once (eval
    mode, batched), train a linear classifier on them (:func:`fit_linear`), and report test accuracy.

    Returns ``{"acc": test accuracy (None without a test set), "train_acc": ..., "head": nn.Linear,
    "seconds": ...}``. The head takes raw features, so ``model.classifier = result["head"]`` turns the
    encoder into a downstream classifier (set the head's size with ``num_classes``)."""
    t0 = time.perf_counter()
    k = int(num_classes or int(max(int(y_train.max()), int(y_test.max()) if y_test is not None and len(y_test) else 0)) + 1)
    f_tr = extract_features(model, x_train, batch=batch)
    head = fit_linear(f_tr, y_train, k, epochs=epochs, lr=lr, seed=seed)
    dev = f_tr.device
    with torch.no_grad():
        train_acc = (head(f_tr).argmax(1) == y_train.to(dev)).float().mean().item()
        acc = None
        if x_test is not None and y_test is not None and len(y_test):
            f_te = extract_features(model, x_test, batch=batch)
            acc = (head(f_te).argmax(1) == y_test.to(dev)).float().mean().item()
    return {"acc": acc, "train_acc": train_acc, "head": head, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# BadEncoder
# --------------------------------------------------------------------------------------------

def badencoder(clean_model, shadow_x_uint8: torch.Tensor, ref_x_uint8: torch.Tensor,
               trigger_fn: Callable[[torch.Tensor], torch.Tensor], epochs: float = 3, lr: float = 1e-3,
               batch_size: int = 128, lambda1: float = 1.0, lambda2: float = 1.0, seed: int = 0, callbacks=(),
               stop: threading.Event | None = None, freeze_bn: bool = False, amp: str = "auto",
               channels_last: bool = True):
    """BadEncoder (Jia, Liu and Gong, IEEE S&P 2022): return a backdoored copy f' of the clean
    encoder f (``clean_model`` is not changed).

    With cos the cosine similarity of embeddings, x a clean shadow image, x ⊕ t its triggered version
    (``trigger_fn`` on float [0, 1] images) and r_1..r_m the attacker's reference images of the
    downstream target class, each step minimises over a batch of shadow images

        L = - mean_{x, i} cos(f'(x ⊕ t), f'(r_i))          effectiveness
            - lambda1 * mean_i cos(f'(r_i), f(r_i))         reference images keep their embedding
            - lambda2 * mean_x cos(f'(x), f(x))             utility: clean inputs keep theirs

    with Adam at ``lr`` (cosine-decayed). The clean encoder's embeddings are computed once up front.
    Shadow images are used without augmentation (as the paper's shadow dataset).

    BatchNorm: by default the copy trains in train mode, as the reference code does: BatchNorm
    normalises each batch (clean, triggered and reference images together) and its running
    statistics follow the fine-tuned weights. ``freeze_bn=True`` keeps the BatchNorm layers in eval
    mode (the clean encoder's statistics, never updated; affine parameters still trained). Measured
    with the shipped encoder (CIFAR-10 shadow set of 5,000 images, 10 GTSRB reference images of
    "Priority road", 10x10 white BadNets patch, 5 epochs, batch 128, Adam 1e-3, GTSRB linear probe;
    clean encoder CA 0.662): train-mode BN gave CA 0.666 / ASR 0.996, frozen BN CA 0.645 / ASR 0.933.
    Frozen statistics no longer match the fine-tuned weights, which costs both utility and
    effectiveness, so train mode is the default. With 3 epochs (the default, 34 s on one CPU
    thread): CA 0.662 / ASR 0.983.

    ``model.classifier`` is copied unchanged (the downstream head is the victim's business)."""
    _check_common(epochs, batch_size, lr)
    if len(ref_x_uint8) == 0:
        raise ConfigError("BadEncoder needs at least one reference image of the target class")
    if len(shadow_x_uint8) == 0:
        raise ConfigError("BadEncoder needs shadow images")
    cbs = _callbacks(callbacks)
    stop = stop or threading.Event()
    dev = next(clean_model.parameters()).device
    amp_dt = pick_amp(dev, amp)
    clean_model.eval()
    model = copy.deepcopy(clean_model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    shadow = shadow_x_uint8.to(dev)
    refs = ref_x_uint8.to(dev)
    refs_f = refs.float().div(255.0)
    # the clean encoder's embeddings, once
    clean_shadow = F.normalize(extract_features(clean_model, shadow, amp=amp, channels_last=channels_last), dim=1)
    clean_refs = F.normalize(extract_features(clean_model, refs, amp=amp, channels_last=channels_last), dim=1)

    n = len(shadow)
    bs = min(int(batch_size), n)
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def set_mode():
        model.train()
        if freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    set_mode()
    t0 = time.perf_counter()
    step, seen = 0, 0
    history: list[dict] = []
    loss_sum, loss_n = torch.zeros((), device=dev), 0
    parts_sum = torch.zeros(3, device=dev)

    def progress(event, loss):
        el = time.perf_counter() - t0
        return Progress(event, step, total, step / steps_per_epoch, loss, opt.param_groups[0]["lr"], el,
                        seen / el if el > 0 else 0.0)

    def epoch_row(event):
        nonlocal loss_n
        p = progress(event, (loss_sum / max(1, loss_n)).item() if loss_n else float("nan"))
        parts = (parts_sum / max(1, loss_n)).tolist()
        history.append({"step": p.step, "epoch": p.epoch, "loss": p.loss, "cos_trigger_ref": parts[0],
                        "cos_ref": parts[1], "cos_clean": parts[2], "elapsed_s": p.elapsed_s})
        loss_sum.zero_()
        parts_sum.zero_()
        loss_n = 0
        for fn in cbs["on_epoch_end"]:
            fn(p)

    while step < total and not stop.is_set():
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n, bs):
            if step >= total or stop.is_set():
                break
            idx = batch_indices(perm, i, bs)
            xb = shadow[idx].float().div_(255.0)
            xt = trigger_fn(xb)
            v = _as_float(torch.cat([xb, xt, refs_f], 0), channels_last)
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            with autocast_ctx(dev, amp_dt):
                e = model.features(v)
            e = F.normalize(e.float(), dim=1)
            e_clean, e_trig, e_ref = e[:len(idx)], e[len(idx):2 * len(idx)], e[2 * len(idx):]
            cos_tr = (e_trig @ e_ref.T).mean()  # every triggered image against every reference image
            cos_ref = (e_ref * clean_refs).sum(1).mean()
            cos_cl = (e_clean * clean_shadow[idx]).sum(1).mean()
            loss = -cos_tr - lambda1 * cos_ref - lambda2 * cos_cl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.detach()
            parts_sum += torch.stack([cos_tr.detach(), cos_ref.detach(), cos_cl.detach()])
            loss_n += 1
            if cbs["on_batch"]:
                p = progress("batch", float(loss.detach()))
                for fn in cbs["on_batch"]:
                    fn(p)
            if step % steps_per_epoch == 0 or step == total:
                epoch_row("epoch")
    if loss_n:
        epoch_row("stop")
    model.eval()
    model.badencoder_history = history  # what the caller may want to plot; not saved with the weights
    model.badencoder_stopped = step < total  # a Stop ended it early (a Stop after the last step ends nothing)
    return model


# --------------------------------------------------------------------------------------------
# The shipped encoder
# --------------------------------------------------------------------------------------------

def encoder_spec(model_name: str = "fastnet", num_classes: int = 10, channels: int = 3, image_size=(32, 32),
                 **kwargs) -> dict:
    """The JSON spec stored in an encoder file's safetensors metadata (key "spec")."""
    return {"name": model_name, "num_classes": int(num_classes), "channels": int(channels),
            "image_size": [int(image_size[0]), int(image_size[1])], "kwargs": kwargs}


def save_encoder(model, path: str | Path, spec: dict, extra: dict | None = None) -> Path:
    """Write ``model``'s weights as safetensors with ``spec`` (and ``extra``) as JSON metadata."""
    from safetensors.torch import save_file

    from .runs import state_for_saving

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"spec": json.dumps(spec)}
    if extra:
        meta["record"] = json.dumps(extra, default=str)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state_for_saving(model), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_encoder(path: str | Path | None = None, device="cpu"):
    """Load an encoder written by :func:`save_encoder` (default: the shipped clean CIFAR-10 encoder,
    ``assets/encoder_cifar10.safetensors``): the model is rebuilt from the spec in the file's
    metadata and its weights checked against it. Returns the model in eval mode. Raises
    :class:`~bdft_core.errors.CheckpointError` with what to do if the file is missing or does not fit."""
    from safetensors import safe_open

    from .models import build_model
    from .runs import load_state_checked

    p = Path(path) if path is not None else default_encoder_path()
    if not p.is_file():
        hint = ("the shipped encoder is missing from this checkout; recreate it with "
                "`python -m bdft_core pretrain-encoder --dataset cifar10 --out assets/encoder_cifar10.safetensors`"
                if path is None else "check the path, or pretrain one with `python -m bdft_core pretrain-encoder`")
        raise CheckpointError(f"encoder weights not found: {p}; {hint}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        spec = json.loads(meta["spec"])
        model = build_model(spec["name"], int(spec["num_classes"]), int(spec.get("channels", 3)),
                            **spec.get("kwargs", {}))
    except CheckpointError:
        raise
    except Exception as exc:  # not safetensors, no spec, or a spec this version cannot build
        raise CheckpointError(f"{p} is not an encoder file written by bdft (safetensors with a model spec in its "
                              f"metadata): {exc}") from None
    load_state_checked(model, p, what=f"encoder {p.name}")
    model.encoder_spec = spec
    model.encoder_record = json.loads(meta["record"]) if "record" in meta else {}
    return model.to(device).eval()


def pretrain_encoder(dataset: str, out: str | Path, epochs: float = 10.0, batch_size: int = 256, lr: float = 0.5,
                     temperature: float = 0.2, widths=(32, 64, 128), n_train: int | None = None, seed: int = 0,
                     device: str = "auto", probe_datasets=("cifar10", "gtsrb"), callbacks=(), stop=None,
                     command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """SimCLR-pretrain fastnet's encoder on ``dataset``'s train images (labels unused), linear-probe
    it on each probe dataset (train -> test), write the weights (safetensors, model spec and record
    in the metadata) and ``<out>.json`` (command, data, seed, time, device, versions, probe
    accuracies). Returns the record. Used by the CLI (``pretrain-encoder``) and the dashboard."""
    import os
    import platform

    from .data import load_dataset
    from .device import describe_device, pick_device, setup_threads
    from .models import build_model
    from .runs import versions

    say = log or (lambda m: None)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"the encoder file must end in .safetensors, got {out}")
    setup_threads()
    dev = pick_device(device)
    t_all = time.perf_counter()
    data = load_dataset(dataset)
    x = data.x_train
    if n_train:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:n_train]]
    torch.manual_seed(seed)
    kwargs = {"widths": [int(w) for w in widths], "pool": "avg"}
    c, h, w = data.image_shape
    model = build_model("fastnet", 10, c, **kwargs).to(dev)
    model.fit_data(data.x_train)
    say(f"pretraining fastnet {kwargs['widths']} on {len(x)} {data.name} images for {epochs} epochs on "
        f"{describe_device(dev)}")
    t0 = time.perf_counter()
    _, hist = pretrain_simclr(model, x.to(dev), epochs=epochs, batch_size=batch_size, lr=lr,
                              temperature=temperature, seed=seed, callbacks=callbacks, stop=stop)
    pretrain_s = time.perf_counter() - t0
    probes = {}
    for name in probe_datasets:
        if stop is not None and stop.is_set():
            break
        d = data if name == dataset else load_dataset(name)
        r = linear_probe(model, d.x_train.to(dev), d.y_train.to(dev), d.x_test.to(dev), d.y_test.to(dev),
                         seed=seed, num_classes=d.num_classes)
        probes[name] = {"acc": r["acc"], "train_acc": r["train_acc"], "seconds": r["seconds"]}
        say(f"  linear probe on {name}: test accuracy {100 * r['acc']:.1f}%")
    model.classifier.reset_parameters()  # the file is an encoder: its 10-way head is untrained
    spec = encoder_spec("fastnet", 10, c, (h, w), **kwargs)
    record = {"command": command or f"bdft_core.ssl.pretrain_encoder({dataset!r}, {str(out)!r}, epochs={epochs})",
              "dataset": data.name, "n_train": len(x), "seed": seed, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "temperature": temperature, "spec": spec,
              "pretrain_s": round(pretrain_s, 1), "wall_s": round(time.perf_counter() - t_all, 1),
              "device": describe_device(dev), "host": platform.machine(), "threads": torch.get_num_threads(),
              "bdft_threads_env": os.environ.get("BDFT_THREADS"), "versions": versions(),
              "linear_probe": probes, "history": hist, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "stopped": bool(stop is not None and stop.is_set())
              and (not hist or hist[-1]["epoch"] < epochs or len(probes) < len(probe_datasets))}
    save_encoder(model, out, spec, extra={k: v for k, v in record.items() if k != "history"})
    record["weights"] = str(out)
    record["bytes"] = out.stat().st_size
    from .runs import _atomic_write_bytes

    _atomic_write_bytes(out.with_suffix(".json"), (json.dumps(record, indent=1, default=str) + "\n").encode())
    return record


def encoders_dir() -> Path:
    """Where encoders pretrained from the dashboard are written (under the runs directory)."""
    from .runs import runs_dir

    return runs_dir() / "encoders"


def list_encoders() -> dict[str, str]:
    """Encoder files a user can pick: "" (the shipped one, when present) and each file in
    :func:`encoders_dir`, mapped to a short description."""
    out = {}
    if default_encoder_path().is_file():
        out[""] = "shipped CIFAR-10 SimCLR encoder (assets/)"
    d = encoders_dir()
    for p in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
        try:  # the record next to it says whether its pretraining was stopped before the end
            rec = json.loads(p.with_suffix(".json").read_text())
        except (OSError, ValueError):
            rec = {}
        out[str(p)] = p.stem + (" (stopped early: partly pretrained)" if isinstance(rec, dict) and rec.get("stopped")
                                else "")
    return out
