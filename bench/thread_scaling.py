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
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bdft_core.device import amp_dtype, setup_threads  # noqa: E402
from throughput import ceiling  # noqa: E402  (the raw-ceiling step: model, optimizer, layout, arithmetic)


def step_rate(threads: int, batch: int, images: int) -> float:
    """Training images per second of a fastnet step on random images (throughput.py's raw ceiling)
    on ``threads`` threads."""
    setup_threads(threads)  # also the allocator setting the CLI and the app use
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(num_classes=10, image_shape=(3, 32, 32),
                           x_train=torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g))
    return ceiling(data, max(5, images // batch), batch, torch.device("cpu"))


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
