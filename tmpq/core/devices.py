"""Devices: ``auto`` (CUDA when this machine has it, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

The name is resolved where the model is placed (a Ray worker resolves ``auto`` on its own node). Tensors that define a
result independently of the device are made on the CPU and moved once (the noise bank's noise), so every device
samples from the same noise.
"""
from __future__ import annotations

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
