"""How a `fastnet` training step scales with CPU threads: one process on all its threads, one
process on one thread, and two one-thread processes side by side (what parallel test workers, or
FT and SFT run side by side, would get). Random images, so no data work; the arithmetic is what
``amp="auto"`` picks on this machine (bf16 autocast where the CPU has native bf16, else fp32).

Usage: python bench/thread_scaling.py [--batch 256 64] [--images 2560] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdft_core.device import amp_dtype, setup_threads  # noqa: E402
from bdft_core.metrics import autocast_ctx  # noqa: E402
from bdft_core.models import build_model  # noqa: E402


def step_rate(threads: int, batch: int, images: int) -> float:
    """Training images per second of a fastnet step (SGD, channels-last) on ``threads`` threads."""
    setup_threads(threads)  # also the allocator setting the CLI and the app use
    dev = torch.device("cpu")
    amp = amp_dtype(dev, "auto")
    torch.manual_seed(0)
    model = build_model("fastnet", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        with autocast_ctx(dev, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: kernel selection, allocator
        step()
    n = max(5, images // batch)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return n * batch / (time.perf_counter() - t0)


def _child(batch: int, images: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--one", str(batch), "--images", str(images)],
                            stdout=subprocess.PIPE, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64], help="batch sizes to measure")
    ap.add_argument("--images", type=int, default=2560, help="images per measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one thread, this batch size
    a = ap.parse_args()
    if a.one:
        print(step_rate(1, a.one, a.images))
        return
    threads = setup_threads()  # all cores this process may use, or BDFT_THREADS, as the CLI does
    rows = []
    for bs in a.batch:
        all_threads = step_rate(threads, bs, a.images)
        one = float(_child(bs, a.images).communicate()[0])
        pair = [_child(bs, a.images), _child(bs, a.images)]
        side_by_side = [float(p.communicate()[0]) for p in pair]
        rows.append({"batch": bs, "threads": threads, "images_per_s": round(all_threads),
                     "one_thread": round(one), "two_one_thread_side_by_side": [round(r) for r in side_by_side]})
        print(f"batch {bs}: {threads} threads {all_threads:,.0f} images/s; 1 thread {one:,.0f}; "
              f"two 1-thread processes side by side {side_by_side[0]:,.0f} + {side_by_side[1]:,.0f} "
              f"= {sum(side_by_side):,.0f} ({sum(side_by_side) / all_threads:.2f}x the {threads}-thread process)")
    if a.json:
        amp = amp_dtype(torch.device("cpu"), "auto")
        print(json.dumps({"arithmetic": "bf16 autocast" if amp is not None else "fp32", "rows": rows}))


if __name__ == "__main__":
    main()
