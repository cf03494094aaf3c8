"""The allocator setting made at start-up: freed tensor memory is reused, not re-faulted."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, torch
from bdft_core.device import setup_threads, tune_allocator
setup_threads(1)
n = 100 * 2**20 // 4  # a 100 MiB float32 tensor: 25,600 pages of 4 KiB
a = torch.ones(n); del a
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n); del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median allocation: the steady state. A mean let one allocation that could not reuse the freed
# block (something else had taken its place in the heap) fault all its pages in and fail the test on CI
faults = sorted(faults)[len(faults) // 2]
print(json.dumps({"tuned": tune_allocator(), "faults_per_alloc": faults, "pages": n * 4 / 4096}))
"""


def probe(tune: str) -> dict:
    env = {**os.environ, "BDFT_MALLOC_TUNE": tune, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    off, on = probe("0"), probe("1")
    assert off["tuned"] is False and on["tuned"] is True
    # glibc's default: a block this large is unmapped when freed, so every allocation faults in all its
    # pages again (in 2 MiB pieces where transparent huge pages are always on: fewer faults, still more)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        assert off["faults_per_alloc"] > on["faults_per_alloc"]
    else:
        assert off["faults_per_alloc"] >= 0.9 * off["pages"]
    # tuned: the same block comes back from the heap, already mapped
    assert on["faults_per_alloc"] <= 0.1 * on["pages"]


@pytest.mark.parametrize("machine,avx512_bf16,amx,onednn,fast", [
    ("x86_64", False, False, True, False),  # AVX-512 without bf16 (Skylake..Ice Lake): oneDNN says yes, but emulates
    ("x86_64", True, False, True, True),    # AVX512-BF16 (Cooper Lake, Zen 4/5)
    ("x86_64", False, True, True, True),    # AMX (Sapphire Rapids)
    ("x86_64", False, False, False, False),  # AVX2 only
    ("aarch64", False, False, True, True),  # ARM: oneDNN checks the bf16 extension itself
    ("aarch64", False, False, False, False),
])
def test_bf16_autocast_only_where_the_cpu_has_bf16_instructions(monkeypatch, machine, avx512_bf16, amx, onednn, fast):
    import platform

    import torch

    from bdft_core.device import amp_dtype, cpu_bf16_fast

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert cpu_bf16_fast() is fast
    assert amp_dtype(torch.device("cpu")) == (torch.bfloat16 if fast else None)


def test_device_description_names_the_arithmetic_runs_use():
    """Runs record the device with the precision that "auto" picks there, since bf16 and fp32 give
    different figures for the same seed; a setting given explicitly is described by what it selects."""
    import torch

    from bdft_core.device import amp_dtype, cpu_bf16_fast, describe_device

    cpu = torch.device("cpu")
    auto = describe_device(cpu)
    assert auto == f"cpu ({torch.get_num_threads()} threads, {'bf16 autocast' if cpu_bf16_fast() else 'fp32'})"
    assert (amp_dtype(cpu) is None) == auto.endswith(", fp32)")
    assert describe_device(cpu, "off").endswith(", fp32)")
    assert describe_device(cpu, "bf16").endswith(", bf16 autocast)")
