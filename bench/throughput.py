"""Training throughput (images/s): our pipeline against a conventional one and the raw ceiling,
measured in the same run on the same model.

- conventional: how established toolkits run it: a torch ``Dataset`` that poisons each image on
  the fly and applies torchvision transforms to PIL images, a ``DataLoader`` with workers, default
  memory format and fp32;
- ours: ``bdft_core.train.Trainer`` (uint8 data on the device, batched poisoning done once,
  batched augmentation, channels-last, bf16 autocast where the hardware has it);
- ceiling: the same model, layout and precision stepping on pre-made tensors with no data work.

Usage: python bench/throughput.py [--dataset cifar10] [--steps 40] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdft_core.attacks import build_attack  # noqa: E402
from bdft_core.data import Splits, load_dataset  # noqa: E402
from bdft_core.device import amp_dtype, describe_device, pick_device, setup_threads  # noqa: E402
from bdft_core.metrics import autocast_ctx  # noqa: E402
from bdft_core.models import build_model  # noqa: E402
from bdft_core.train import TrainConfig, Trainer  # noqa: E402


class PoisonedImages(torch.utils.data.Dataset):
    """The conventional per-image pipeline: PIL image -> poison (if chosen) -> transforms."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, attack, poison_set: set[int], transform):
        self.x, self.y, self.attack, self.poison, self.t = x_hwc, y, attack, poison_set, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        def pil(hwc):  # grayscale images are (H, W, 1) here and mode "L" in PIL
            return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)

        img = pil(self.x[i])
        label = int(self.y[i])
        if i in self.poison:
            arr = np.array(img)  # a writable copy, as torch wants
            t = torch.from_numpy(arr.reshape(*arr.shape[:2], -1)).permute(2, 0, 1)[None].float() / 255
            arr = (self.attack.apply(t)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            img, label = pil(arr), self.attack.target
        return self.t(img), label


def conventional(data, attack, steps, bs, workers, device):
    import torchvision.transforms as T

    torch.manual_seed(0)
    model = build_model("fastnet", data.num_classes, data.image_shape[0]).to(device)
    model.fit_data(data.x_train)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    poison = set(Splits(len(data.y_train), 0).poison_indices(len(data.y_train) // 10).tolist())
    ds = PoisonedImages(data.x_train.permute(0, 2, 3, 1).numpy(), data.y_train.numpy(), attack, poison,
                        T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(data.image_shape[1], padding=2,
                                                                           padding_mode="reflect"), T.ToTensor()]))
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0)
    n, t0, it = 0, None, iter(dl)
    for step in range(steps + 3):
        if step == 3:  # warm-up excluded (worker start-up included in the warm-up)
            t0, n = time.perf_counter(), 0
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(dl)
            xb, yb = next(it)
        xb, yb = xb.to(device), yb.to(device)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def ours(data, attack, steps, bs, device):
    torch.manual_seed(0)
    model = build_model("fastnet", data.num_classes, data.image_shape[0])
    ps = attack.poison(data.x_train, data.y_train, 0.1, Splits(len(data.y_train), 0))
    model.fit_data(ps.x.cpu())
    model.to(device)
    x, y = ps.x.to(device), ps.y.to(device)
    n = len(y)

    def timed(k):  # (steps taken, wall time) of a Trainer.run() of about k steps, finished on the device
        tr = Trainer(model, x, y, TrainConfig(epochs=k * bs / n, batch_size=bs, translate=2))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = tr.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return res.steps, time.perf_counter() - t

    # the difference of two whole runs, after a warm-up run: nothing inside the loop is timed (a
    # per-step callback would force a GPU sync every step) and start-up costs cancel
    timed(3)
    (s1, t1), (s0, t0) = timed(steps + 3), timed(3)
    return (s1 - s0) * bs / (t1 - t0)


def ceiling(data, steps, bs, device):
    torch.manual_seed(0)
    model = build_model("fastnet", data.num_classes, data.image_shape[0]).to(device)
    model.fit_data(data.x_train)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    amp = amp_dtype(device)
    xb = torch.rand(bs, *data.image_shape, device=device).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, data.num_classes, (bs,), device=device)
    for step in range(steps + 3):
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast_ctx(device, amp):
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: number of cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    threads = setup_threads()
    device = pick_device(a.device)
    data = load_dataset(a.dataset)
    attack = build_attack("badnets", data.image_shape, data.num_classes)
    workers = a.workers if a.workers is not None else (os.cpu_count() or 2)
    res = {"dataset": a.dataset, "device": describe_device(device), "cpu": platform.processor() or platform.machine(),
           "threads": threads, "batch_size": a.batch_size, "steps": a.steps, "workers": workers,
           "torch": torch.__version__}
    res["conventional_img_s"] = conventional(data, attack, a.steps, a.batch_size, workers, device)
    res["ours_img_s"] = ours(data, attack, a.steps, a.batch_size, device)
    res["ceiling_img_s"] = ceiling(data, a.steps, a.batch_size, device)
    res["speedup_vs_conventional"] = res["ours_img_s"] / res["conventional_img_s"]
    res["fraction_of_ceiling"] = res["ours_img_s"] / res["ceiling_img_s"]
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")


if __name__ == "__main__":
    main()
