"""Reuse of deep features across denoising steps (DeepCache, Ma et al., CVPR 2024; for transformers, the block-
residual caching of FORA / Delta-DiT).

Adjacent denoising steps compute nearly the same deep features. On a *reuse* step the deep part of the denoiser is
not run: its result from the last *full* step stands in, and only the shallow part runs on the new input.

- A UNet (``down_blocks`` / ``mid_block`` / ``up_blocks``: ``UNet2DModel``, ``UNet2DConditionModel``): the shallow
  part is the first ``branch`` down blocks and the last ``branch`` up blocks (with ``conv_in`` / ``conv_out`` and the
  embeddings); the deep part is the rest. On a reuse step the deep blocks return their outputs of the last full step,
  so the first shallow up block receives the cached deep feature beside fresh skip connections.
- A transformer (``transformer_blocks``: ``DiTTransformer2DModel``, ``Transformer2DModel``): the shallow part is the
  first and last ``branch`` blocks; a reuse step adds the deep blocks' cached residual (their output minus their input
  at the last full step) to the new input of the deep range, and the deep blocks do not run.

``plan[k]`` says whether denoiser call ``k`` of a trajectory reuses (call 0 never can: there is nothing cached). The
sampler's ``on_step(k, t, x)`` hook tells the cache which call comes next (:meth:`DeepCache.on_step`), so any sampler
loop that calls it drives the cache; a trajectory starts over at ``k = 0`` (each batch of images is its own
trajectory). Several denoiser calls in one step (the supernet's separate guidance passes) are cached one by one.

Example:
    >>> from tmpq.core.model import load_model
    >>> m = load_model()
    >>> with DeepCache(m.unet, [False, True, False, True, False]) as dc:   # doctest: +SKIP
    ...     imgs = sample_images(m.unet, sched, [800, 600, 400, 200, 0], 16, on_step=dc.on_step)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tmpq.core.adapters import denoiser_of, index_time
from tmpq.core.errors import TmpqError


def deep_modules(model: nn.Module, branch: int = 1) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The kind of split (``"unet"`` or ``"blocks"``) and the deep modules (name, module), in call order, of
    ``model``'s denoiser at depth ``branch``; a one-line error when the class has no split or ``branch`` leaves no
    deep part."""
    inner = denoiser_of(model)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 1:
        raise TmpqError(f"reuse branch: must be an integer >= 1, got {branch!r}")
    if hasattr(inner, "down_blocks") and hasattr(inner, "up_blocks"):
        n = len(inner.down_blocks)
        if branch >= n:
            raise TmpqError(f"reuse branch: {type(inner).__name__} has {n} down blocks, so branch must be < {n}, "
                            f"got {branch}")
        deep = [(f"down_blocks.{i}", inner.down_blocks[i]) for i in range(branch, n)]
        if getattr(inner, "mid_block", None) is not None:
            deep.append(("mid_block", inner.mid_block))
        deep += [(f"up_blocks.{i}", inner.up_blocks[i]) for i in range(len(inner.up_blocks) - branch)]
        return "unet", deep
    if hasattr(inner, "transformer_blocks"):
        n = len(inner.transformer_blocks)
        if 2 * branch >= n:
            raise TmpqError(f"reuse branch: {type(inner).__name__} has {n} blocks, so branch must be < {n / 2:g}, "
                            f"got {branch}")
        return "blocks", [(f"transformer_blocks.{i}", inner.transformer_blocks[i]) for i in range(branch, n - branch)]
    raise TmpqError(f"reuse: no deep/shallow split known for {type(inner).__name__} (a UNet with down_blocks / "
                    "up_blocks or a transformer with transformer_blocks)")


def reused_layers(model: nn.Module, branch: int = 1) -> set[str]:
    """Names (relative to the denoiser) of every submodule inside the deep part: what a reuse step does not run
    (the cost model counts their BitOPs on full steps only)."""
    _kind, deep = deep_modules(model, branch)
    return {f"{name}.{sub}" if sub else name for name, mod in deep for sub, _ in mod.named_modules()}


def reuse_plan(calls: Sequence[int], n_calls: int) -> tuple[bool, ...]:
    """The per-call plan of a trajectory of ``n_calls`` denoiser calls from the indices of the calls that reuse."""
    calls = set(int(k) for k in calls)
    if any(k < 1 or k >= n_calls for k in calls):
        raise TmpqError(f"reuse: calls must lie within 1..{n_calls - 1}, got {sorted(calls)}")
    return tuple(k in calls for k in range(n_calls))


def check_plan(plan: Sequence[bool]) -> tuple[bool, ...]:
    plan = tuple(bool(p) for p in plan)
    if plan and plan[0]:
        raise TmpqError("reuse plan: the first denoiser call cannot reuse (nothing is cached yet)")
    return plan


def reusing(model: nn.Module, calls: Sequence[int], branch: int, n_calls: int, timesteps: Sequence[int] = ()):
    """A context that reuses on ``calls`` of each ``n_calls``-call trajectory, or does nothing when ``calls`` is
    empty; its value's ``on_step`` drives the cache (None for nothing). With ``timesteps`` the cache follows the
    denoiser's own calls instead (see :class:`DeepCache`), for a loop that has no ``on_step`` (a stock pipeline)."""
    import contextlib

    if not calls:
        return contextlib.nullcontext(_NoReuse())
    return DeepCache(model, reuse_plan(calls, n_calls), branch, timesteps=timesteps)


class _NoReuse:
    on_step = None


class DeepCache:
    """Installs the reuse on ``model``'s denoiser for the duration of a ``with`` block (see the module doc).

    ``timesteps``: the schedule, when no sampler loop calls :meth:`on_step` (a stock diffusers pipeline): a forward
    pre-hook on ``model`` counts its calls, a call at the schedule's first timestep starting a trajectory; a call that
    is not part of one (before any, or past the plan's last call) runs in full and counts nowhere."""

    def __init__(self, model: nn.Module, plan: Sequence[bool], branch: int = 1, timesteps: Sequence[int] = ()):
        self.plan = check_plan(plan)
        self.kind, self.deep = deep_modules(model, branch)
        self.branch = branch
        self.model = model
        self.first_t = int(timesteps[0]) if len(timesteps) else None
        self._hook = None
        self._last_t = None
        self._k = 0
        self._in_trajectory = False  # a call k of the plan is running (on_step), not a call outside any trajectory
        self._cache: dict = {}
        self._calls: dict = {}
        self._saved: list = []
        self.full_calls = self.reuse_calls = 0

    def on_step(self, k: int, t=None, x=None) -> None:
        """Called before denoiser call ``k`` of a trajectory (the sampler's ``on_step``)."""
        if k == 0:
            self._cache.clear()
        self._in_trajectory = True
        self._k = k
        self._calls.clear()
        if self.reusing():
            self.reuse_calls += 1
        else:
            self.full_calls += 1

    def reusing(self) -> bool:
        return self._in_trajectory and self._k < len(self.plan) and self.plan[self._k]

    def _slot(self, name: str) -> tuple[str, int]:
        i = self._calls.get(name, 0)
        self._calls[name] = i + 1
        return name, i

    def _wrap_unet(self, name: str, mod: nn.Module):
        orig = mod.forward

        def forward(*args, **kwargs):
            slot = self._slot(name)
            if self.reusing():
                if slot not in self._cache:
                    raise TmpqError(f"reuse: no cached output of {name} (a reuse step before any full step)")
                return self._cache[slot]
            out = orig(*args, **kwargs)
            self._cache[slot] = out
            return out

        return forward

    def _wrap_block(self, i: int, name: str, mod: nn.Module):
        orig = mod.forward
        first, last = i == 0, i == len(self.deep) - 1

        def forward(hidden_states, *args, **kwargs):
            if first:  # one pass through the deep range per denoiser call: its index within the step
                self._slot("deep-range")
            j = self._calls["deep-range"] - 1
            if self.reusing():
                if first:
                    if ("residual", j) not in self._cache:
                        raise TmpqError(f"reuse: no cached residual of the deep blocks ({name})")
                    return hidden_states + self._cache[("residual", j)]
                return hidden_states
            if first:
                self._cache[("input", j)] = hidden_states
            out = orig(hidden_states, *args, **kwargs)
            if last:
                self._cache[("residual", j)] = out - self._cache.pop(("input", j))
            return out

        return forward

    def _pre_hook(self, _module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = torch.as_tensor(t).flatten()[:1]
        t = int(index_time(self.model, t)[0])  # the model time of the call, on tmpq's integer grid
        if t == self._last_t:  # another pass of the same step (the supernet's separate guidance passes)
            return
        self._last_t = t
        if t == self.first_t:
            self.on_step(0)
        elif self._in_trajectory and self._k + 1 < len(self.plan):
            self.on_step(self._k + 1)
        else:  # a call outside a trajectory of the schedule (a direct forward, a longer schedule): it runs in full
            self._in_trajectory = False
            self._calls.clear()

    def __enter__(self) -> DeepCache:
        if self.first_t is not None:
            self._hook = self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        for i, (name, mod) in enumerate(self.deep):
            self._saved.append((mod, mod.__dict__.get("forward")))
            if self.kind == "unet":
                mod.forward = self._wrap_unet(name, mod)
            else:
                mod.forward = self._wrap_block(i, name, mod)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for mod, prev in self._saved:
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
        self._saved.clear()
        self._cache.clear()
