"""Supernet files: the calibrated quantizer state as safetensors, with the supernet config, the model's fingerprint,
the format version, the timestep-group boundaries and the calibration progress in its metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes, malformed
from tmpq.supernet.config import SupernetConfig

SUPERNET_FORMAT = "tmpq.supernet"
SUPERNET_VERSION = 2  # 2: optional time_groups (banks + time_starts); v1 files load unchanged


def read_supernet_file(path: Path | str, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata (and tensors) of a supernet file; a missing, damaged or foreign file is a one-line ``TmpqError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TmpqError(f"supernet file not found: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TmpqError(f"cannot read the supernet file {path}: {exc.strerror or exc}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:
        raise TmpqError(f"corrupt or truncated supernet file {path}: {str(exc).splitlines()[0]}") from None
    if meta.get("format") != SUPERNET_FORMAT:
        raise TmpqError(f"{path} is not a tmpq supernet file (format {meta.get('format')!r})")
    return meta, state


def save_supernet(net, path: Path | str, progress: dict | None = None) -> Path:
    """Quantizer state as safetensors; config, fingerprint, format and calibration progress in its metadata
    (atomic write: a crash leaves the previous file)."""
    from safetensors.torch import save


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SUPERNET_FORMAT, "version": str(SUPERNET_VERSION), "config": net.config.to_json(),
            "model_fingerprint": net.fingerprint,
            "progress": json.dumps(progress or {"complete": True})}
    if net.config.time_groups > 1:
        meta["time_starts"] = json.dumps(net.time_starts)
    # fsync'd temp file + rename, with a plain open's permissions (safetensors' own writer made it owner-only)
    atomic_write_bytes(path, canonical_safetensors(save(net.quantizer_state(), metadata=meta)))
    return path


def canonical_safetensors(data: bytes) -> bytes:
    """Safetensors bytes with the metadata keys of their header in sorted order, so that the same state and metadata
    always give the same bytes (safetensors writes the metadata from a hash map, in an order that varies from call to
    call). Tensor entries and data are kept as written (safetensors orders those itself); the header is re-padded
    with spaces to 8 bytes as safetensors pads it. Readers see the same metadata and tensors either way."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def load_supernet(net, path: Path | str, allow_partial: bool = False) -> dict:
    """Load quantizer state saved by :meth:`save`; refuses a file for another model or config, and an unfinished
    calibration unless ``allow_partial``. Returns the calibration progress record."""

    path = Path(path)
    meta, state = read_supernet_file(path, tensors=True)
    if meta.get("model_fingerprint") != net.fingerprint:
        raise TmpqError(f"supernet file {path} was calibrated for a different model "
                        f"({meta.get('model_fingerprint', '?')[:12]} vs {net.fingerprint[:12]})")
    with malformed(path, "supernet file metadata"):
        config = SupernetConfig.from_json(meta.get("config", "{}"))
        progress = json.loads(meta.get("progress", "{}"))
        if not isinstance(progress, dict):
            raise TypeError(f"progress: expected an object, got {type(progress).__name__}")
    if config != net.config:
        raise TmpqError(f"supernet file {path} was made with a different supernet config")
    if not progress.get("complete") and not allow_partial:
        raise TmpqError(f"supernet file {path} holds an unfinished calibration (done: "
                        f"{progress.get('done_a_bits')}); rerun calibration to resume it")
    if progress.get("complete"):  # an unfinished file may hold observers' initial +-inf for options still to come
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TmpqError(f"supernet file {path} holds non-finite quantizer state ({name}); recalibrate it")
    try:
        missing, unexpected = net.unet.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise TmpqError(f"supernet file {path} does not fit: {str(exc).splitlines()[0]}") from None
    missing = [k for k in missing if ".w_quant." in k or ".a_quant" in k or ".wino." in k]
    if missing or unexpected:
        raise TmpqError(f"supernet file {path} does not fit: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for layer in net.layers.values():
        layer.invalidate_cache()
    net.time_starts, net._live_group = [], None
    if net.config.time_groups > 1:
        try:
            starts = [int(v) for v in json.loads(meta["time_starts"])]
        except (KeyError, TypeError, ValueError):
            starts = None
        if progress.get("complete") and (starts is None or len(starts) >= net.config.time_groups):
            raise TmpqError(f"supernet file {path} lacks the boundaries of its {net.config.time_groups} "
                            f"timestep groups")
        net.time_starts = starts or []
    net._calibrated = bool(progress.get("complete"))
    return progress


def supernet_config_of(path: Path | str) -> SupernetConfig:
    """The supernet config a file was made with."""
    meta, _ = read_supernet_file(path, tensors=False)
    try:
        return SupernetConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TmpqError(f"supernet file {path} has a malformed config: {exc}") from None
