"""Devices: ``auto`` (CUDA when this machine has it, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

The name is resolved where the model is placed (a Ray worker resolves ``auto`` on its own node). Tensors that define a
result independently of the device are made on the CPU and moved once (the noise bank's noise), so every device
samples from the same noise.
"""
from __future__ import annotations

import ctypes
import os
import re

import torch

from tmpq.core.errors import TmpqError

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str, key: str = "executor.device") -> str:
    """The name itself is valid (not whether this machine has the device)."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise TmpqError(f"{key}: must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str = "auto", key: str = "executor.device") -> str:
    """The torch device of ``name`` on this machine; one line when it asks for CUDA that is not here."""
    check_device_name(name, key)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TmpqError(f"{key}: {name} requested, but this machine has no CUDA device (torch "
                            f"{torch.__version__}, torch.cuda.is_available() is False); use cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TmpqError(f"{key}: {name} requested, but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s)")
    return name


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator = "stock"


def tune_cpu_allocator() -> str:
    """Keep freed memory in this process for the next tensor (glibc: no mmap per large block, no trimming of the
    heap), once per process; what is in effect comes back as one line (also :func:`cpu_allocator`).

    A CPU denoiser call allocates and frees tens of MB per op; glibc serves large blocks by fresh mmaps (from 128 KB
    on; its adaptive threshold rises to 32 MB at most) and trims the top of its heap, so their pages fault in again on
    first touch, zeroed by the kernel. Measured on the embedded UNet at batch 256 (2 threads, AMD EPYC Zen 4): ~1e4-3e4 page
    faults per call with glibc's defaults, none after this. Numbers do not change (only where memory comes from);
    the process keeps its peak memory instead of returning it. ``TMPQ_CPU_ALLOCATOR=stock`` leaves glibc's defaults;
    on a C library other than glibc nothing is done."""
    global _allocator
    if _allocator != "stock":
        return _allocator
    if os.environ.get("TMPQ_CPU_ALLOCATOR", "").strip().lower() == "stock":
        return "glibc defaults (TMPQ_CPU_ALLOCATOR=stock)"
    try:
        libc = ctypes.CDLL("libc.so.6")  # only glibc has gnu_get_libc_version
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        glibc = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "stock (not glibc)"
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return f"glibc {glibc} defaults (mallopt refused)"
    _allocator = f"glibc {glibc}: no mmap for large blocks, no heap trimming (tmpq.core.devices.tune_cpu_allocator)"
    return _allocator


def release_freed_memory() -> bool:
    """Hand the memory this process has freed back to the system (glibc's ``malloc_trim``), e.g. after calibration,
    whose transient tensors (each option's quantized weights, observers' inputs) would otherwise stay resident through
    the whole search: measured 300 MiB of 2.1 GiB on a 0.22 B-parameter UNet supernet. True where it ran (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def cpu_allocator() -> str:
    """What :func:`tune_cpu_allocator` put in effect in this process ("stock": glibc's defaults)."""
    return _allocator
