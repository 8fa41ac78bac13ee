"""Devices (issue 22 item 1) on a machine without CUDA: cpu and auto give bit-identical results, a CUDA device name
is one line, and the executor's GPU settings are checked."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_cli
from tests.test_search_service import tiny_cfg
from tmpq.core.devices import resolve_device
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.search import run_search

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the no-CUDA answers differ")


@no_cuda
def test_device_names_resolve_or_fail_in_one_line():
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(TmpqError, match="executor.device: cuda:1 requested, but this machine has no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(TmpqError, match="executor.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        config_from_dict({"executor": {"device": "gpu"}})
    with pytest.raises(TmpqError, match="executor.gpus_per_worker: must be >= 0"):
        config_from_dict({"executor": {"gpus_per_worker": -0.5}})
    assert config_from_dict({"executor": {"device": "cuda:0", "gpus_per_worker": 0.25}}).executor.device == "cuda:0"


@no_cuda
def test_cpu_and_auto_give_the_same_front_and_cuda_is_refused(tiny_model_dir, tmp_path, capsys):
    import dataclasses

    def rows(device: str):
        cfg = tiny_cfg(tiny_model_dir, generations=1)
        cfg = dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, device=device))
        run = run_search(cfg, tmp_path / device, progress=False)
        out = [json.loads(line) for line in run.log_path.read_text().splitlines()]
        return [(r["key"], {k: v for k, v in r["objectives"].items() if k != "eval_s"}) for r in out]  # no clocks

    cpu = rows("cpu")
    assert cpu == rows("auto") and len(cpu) == 6
    code, _, err = run_cli(["sample", "--model", tiny_model_dir, "--device", "cuda", "--n", "2", "--out",
                            tmp_path / "g.png"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "tmpq: error: --device: cuda requested, but this machine has no CUDA device")
    with pytest.raises(TmpqError, match="executor.device: cuda requested"):
        cfg = tiny_cfg(tiny_model_dir, generations=1)
        run_search(dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, device="cuda")),
                   tmp_path / "cuda", progress=False)
    assert not (tmp_path / "cuda").exists()  # refused before any run directory




_ALLOC = """
import ctypes, json, sys, torch
from tmpq.core.devices import cpu_allocator, tune_cpu_allocator
said = tune_cpu_allocator() if sys.argv[1] == "tune" else "untouched"
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
x = torch.ones(16 << 20)  # 64 MB: above glibc's largest mmap threshold
print(json.dumps({"said": said, "now": cpu_allocator(), "in_heap": x.data_ptr() < libc.sbrk(0)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator tuning is glibc's")
@pytest.mark.parametrize("mode", ["tune", "stock-env", "untouched"])
def test_the_tuned_cpu_allocator_serves_large_tensors_from_the_heap(mode):
    """With the tuning a 64 MB tensor comes from the heap (below the program break), where a freed block serves the
    next one without faulting its pages in again; with glibc's defaults (TMPQ_CPU_ALLOCATOR=stock, or never tuned)
    it is a fresh mmap of its own, returned to the kernel on free. Each mode in a fresh process: the tuning is
    process-wide."""
    env = {**os.environ, "TMPQ_CPU_ALLOCATOR": "stock" if mode == "stock-env" else ""}
    out = subprocess.run([sys.executable, "-c", _ALLOC, "tune" if mode != "untouched" else "no"], env=env,
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "tune":
        assert r["said"].startswith("glibc ") and "no mmap" in r["said"] and r["now"] == r["said"]
    else:
        assert r["now"] == "stock" and (mode == "untouched" or "TMPQ_CPU_ALLOCATOR=stock" in r["said"])
    assert r["in_heap"] == (mode == "tune")
