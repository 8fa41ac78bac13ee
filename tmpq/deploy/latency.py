"""The measured latency table of a search (``search.cost = "latency"``): what each quantized layer costs on the
deployment backend per sample, on its int8 kernel and off it, plus the measured rest of a denoiser call.

Backend: tmpq's own CPU int8 path (:mod:`tmpq.deploy.int8`, oneDNN static int8 conv / Linear), the one ``tmpq speed``
times. There every (w, a) option the kernels take (:meth:`LayerOption.why_not_w8a8`: weights and activations of at
most 8 bits, on a symmetric per-channel grid) runs the same int8 kernel whatever its width, and every other option
(16-bit layers, the pinned 16-bit inputs, a layer whose geometry or check refuses the kernel) runs fake quantization
in float: so a layer has two entries, ``int8`` and ``fp``, and ``int8_options`` says which options take the first.

How (:func:`measure_table`), on two fresh copies of the calibrated supernet over the CPU model (its own layout):

- *int8*: every layer at its widest int8 option, converted and checked as deployment does (:func:`to_int8`);
- *fp*: every layer at its widest other option (pins as pinned), left in fake quantization.

Each is timed on real denoiser calls (batch ``batch``) in ``repeats`` rounds, medians over the rounds: a plain call,
a call with a timing hook on every quantized layer (each layer's own wall inside the real call, so cache effects are
those of the call) and, with reuse, a reuse call right after a full one.
``remainder`` = plain call - sum of the int8 layers + the sampler's own per-call work (a short sampling run minus its
calls): norms, attention softmax, activations, the scheduler step. ``remainder_reuse`` is the same for a call that
reuses deep features (:class:`tmpq.core.reuse.DeepCache`): the call runs the shallow layers only. All in seconds per
sample; the search space sums them per candidate (:meth:`tmpq.search.space.SearchSpace.latency`).

The table carries a fingerprint of what it was measured on (CPU model, int8 ISA, oneDNN cap, whether the kernels
saturate, torch version, thread count, batch); a run stores it as ``latency.json`` and a resume on another
fingerprint is refused (:func:`check_fingerprint`).
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tmpq.core.adapters import adapter_for, denoise, denoiser_of, sample_shape
from tmpq.core.cost import LATENCY_FILE
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes, malformed, read_json
from tmpq.core.reuse import DeepCache, reused_layers
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
from tmpq.deploy.int8 import cpu_int8_features, schedule_probe, to_int8
from tmpq.deploy.plan import LayerOption, QuantPlan

TABLE_FORMAT = "tmpq.latency-table"
TABLE_VERSION = 1
TABLE_FILE = LATENCY_FILE
BACKEND = "cpu-onednn-int8"  # tmpq.deploy.int8; a CUDA backend (torchao) would record its own name


def latency_fingerprint(batch: int) -> dict:
    """What a table's numbers depend on besides the model: backend, CPU, its int8 ISA, torch, threads, batch."""
    feat = cpu_int8_features()
    return {"backend": BACKEND, "device": "cpu", "cpu": feat["cpu"], "int8_isa": list(feat["int8_isa"]),
            "onednn_max_cpu_isa": feat["onednn_max_cpu_isa"], "saturating_pairs": bool(feat["saturating_pairs"]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": int(batch)}


def check_fingerprint(table: dict, fingerprint: dict, where: Path | str) -> None:
    """Refuse (one line naming what differs) a stored table measured on another machine or setting: the run's
    logged latencies were predicted from it, and a re-measured table would put two machines' numbers in one front."""
    stored = table.get("fingerprint", {})
    diff = [f"{k} {stored.get(k)!r} -> {fingerprint.get(k)!r}" for k in sorted(set(stored) | set(fingerprint))
            if stored.get(k) != fingerprint.get(k)]
    if diff:
        raise TmpqError(f"refusing to resume with {where}: its latency table was measured on another setting "
                        f"({'; '.join(diff)}); resume with the same threads and batch on the same kind of machine, "
                        f"or start a new run")


def read_table(path: Path) -> dict:
    """A stored table, checked for its form (one line naming the file when it is not one)."""
    d = read_json(path, "latency table")
    with malformed(path, "latency table"):
        if d.get("format") != TABLE_FORMAT or d.get("version") != TABLE_VERSION:
            raise ValueError(f"not a {TABLE_FORMAT} v{TABLE_VERSION} (format {d.get('format')!r})")
        if not isinstance(d["fingerprint"], dict) or not isinstance(d["layers"], dict):
            raise TypeError("fingerprint and layers: expected JSON objects")
        for e in d["layers"].values():
            float(e["int8"]), float(e["fp"])
        float(d["remainder"]), float(d.get("remainder_reuse", 0.0))
        [(int(w), int(a)) for w, a in d["int8_options"]]
    return d


def write_table(path: Path, table: dict) -> None:
    atomic_write_bytes(path, (json.dumps(table, indent=2, sort_keys=True) + "\n").encode())


def int8_options(net) -> list[list[int]]:
    """The (w, a) options of the supernet (pins included) that deployment runs on the int8 kernels (by option; a
    layer's geometry may still refuse them, and its ``int8`` entry then is its fallback's time)."""
    found = set()
    for layer in net.layers.values():
        saved = (layer.w_index, layer.a_index)
        try:
            for wi, w in enumerate(layer.w_bits):
                for ai, a in enumerate(layer.a_bits):
                    layer.set_bits(wi, ai)
                    if LayerOption.of(layer).why_not_w8a8() is None:
                        found.add((int(w), int(a)))
        finally:
            layer.set_bits(*saved)
    return [list(p) for p in sorted(found)]


def _widest(layer, options: set, int8: bool) -> tuple[int, int]:
    """(w index, a index) of the layer's widest option that is (``int8``) or is not an int8 option; its widest
    option when it has none such."""
    pairs = [(wi, ai) for wi in range(len(layer.w_bits)) for ai in range(len(layer.a_bits))]
    bits = lambda p: (int(layer.w_bits[p[0]]), int(layer.a_bits[p[1]]))  # noqa: E731
    chosen = [p for p in pairs if (bits(p) in options) == int8] or pairs
    return max(chosen, key=lambda p: (bits(p)[0] * bits(p)[1], bits(p)))


@torch.no_grad()
def _time_calls(unet, fqns: list[str], batch: int, repeats: int, t: int, reuse_branch: int) -> dict:
    """Median plain call, median per-layer wall inside hooked calls and (``reuse_branch``) a reuse call's median,
    in seconds per call of ``batch`` samples. Measured in ``repeats`` rounds of one call of each kind, so that a
    burst of load from other processes spoils a sample of each rather than every sample of one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *sample_shape(unet), generator=g)
    tt = torch.full((batch,), t)
    cond = adapter_for(unet).example(denoiser_of(unet), batch, x.device)

    def call() -> float:
        t0 = time.perf_counter()
        denoise(unet, x, tt, cond)
        return time.perf_counter() - t0

    call()
    call()
    acc = dict.fromkeys(fqns, 0.0)  # this call's wall per layer (a layer called twice in a call sums)
    start: dict[str, float] = {}

    def hooked() -> None:
        handles = []
        for f in fqns:
            mod = unet.get_submodule(f)
            handles.append(mod.register_forward_pre_hook(
                lambda _m, _a, f=f: start.__setitem__(f, time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda _m, _a, _o, f=f: acc.__setitem__(f, acc[f] + time.perf_counter() - start[f])))
        acc.update(dict.fromkeys(fqns, 0.0))
        try:
            call()
        finally:
            for h in handles:
                h.remove()

    plain, reuse, per = [], [], {f: [] for f in fqns}
    for _ in range(repeats):
        if reuse_branch:  # a full call (timed: a plain sample) that fills the cache, then a reuse call
            with DeepCache(unet, (False, True), reuse_branch) as dc:
                dc.on_step(0)
                plain.append(call())
                dc.on_step(1)
                reuse.append(call())
        else:
            plain.append(call())
        hooked()
        for f in fqns:
            per[f].append(acc[f])
    out = {"call_s": statistics.median(plain), "layer_s": {f: statistics.median(xs) for f, xs in per.items()}}
    if reuse_branch:
        out["reuse_call_s"] = statistics.median(reuse)
    return out


def _set_options(net, chooser: Callable) -> None:
    for layer in net.layers.values():
        layer.set_bits(*chooser(layer))


def measure_table(load_net: Callable[[], object], scheduler_config: dict, *, batch: int, repeats: int = 5,
                  reuse_branch: int = 0, steps: int = 4, progress: bool = False) -> dict:
    """Measure the latency table (see the module doc). ``load_net()`` gives a fresh calibrated ``QuantSupernet`` over
    a fresh CPU copy of the model (called twice: the int8 conversion replaces layers in place); ``steps``: the
    short DDIM sampling run that measures the sampler's per-call work."""
    if batch < 1 or repeats < 1:
        raise TmpqError(f"latency table: batch and repeats must be >= 1, got {batch}, {repeats}")
    sched = make_scheduler(scheduler_config)
    T = int(sched.config.num_train_timesteps)
    ts = make_timesteps("uniform", steps, T)
    t_mid = ts[len(ts) // 2]

    net = load_net()
    fqns = [i.fqn for i in net.infos]
    options = {tuple(p) for p in int8_options(net)}
    deep = reused_layers(net.unet, reuse_branch) if reuse_branch else set()
    # the int8 model: every layer at its widest int8 option, converted and checked as deployment does
    _set_options(net, lambda lay: _widest(lay, options, True))
    if progress:
        print(f"latency table: converting {len(fqns)} layers to int8 and timing them (batch {batch}) ...", flush=True)
    _, rows = to_int8(net.unet, schedule_probe(sched, ts, n=min(batch, 4)), plan=QuantPlan.from_model(net.unet))
    i8 = _time_calls(net.unet, fqns, batch, repeats, t_mid, reuse_branch)
    # the sampler's own work per call: a short sampling run of the int8 model minus its denoiser calls
    walls = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        sample_images(net.unet, sched, ts, batch, seed=0, batch_size=batch, progress=False)
        walls.append(time.perf_counter() - t0)
    sampler_s = statistics.median(walls) / len(ts) - i8["call_s"]
    del net

    net = load_net()
    # kept quantized weights as the deployed model keeps them (the supernet's default budget)
    _set_options(net, lambda lay: _widest(lay, options, False))
    fp = _time_calls(net.unet, fqns, batch, repeats, t_mid, 0)
    del net

    per = 1.0 / batch
    step = max(0.0, sampler_s)
    sum_i8 = sum(i8["layer_s"].values())
    table = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "unit": "seconds per sample",
        "fingerprint": latency_fingerprint(batch),
        "int8_options": [list(p) for p in sorted(options)],
        "layers": {f: {"int8": i8["layer_s"][f] * per, "fp": fp["layer_s"][f] * per} for f in fqns},
        "remainder": (i8["call_s"] - sum_i8 + step) * per,
        "measured": {"repeats": repeats, "t": int(t_mid), "sampler_steps": steps,
                     "int8_call_s": i8["call_s"] * per, "fp_call_s": fp["call_s"] * per,
                     "sampler_s_per_call": sampler_s * per,
                     # the fp model's own remainder: a check on the int8 one (the same norms and activations)
                     "remainder_fp": (fp["call_s"] - sum(fp["layer_s"].values()) + step) * per,
                     "int8_layers": sum(r["int8"] for r in rows),
                     "fallbacks": {r["fqn"]: r["why"] for r in rows if not r["int8"]}},
    }
    if reuse_branch:
        shallow = sum(s for f, s in i8["layer_s"].items() if f not in deep)
        table["reuse_branch"] = int(reuse_branch)
        table["remainder_reuse"] = (i8["reuse_call_s"] - shallow + step) * per
        table["measured"]["int8_reuse_call_s"] = i8["reuse_call_s"] * per
    return table
