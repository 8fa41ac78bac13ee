"""The names of the enumerated options that live in torch-importing modules, kept here without torch: the CLI's
``choices`` (``tmpq --help`` loads no torch) and the config checks read them here, and the modules that act on them
import them from here (so each list has one source). Enumerations whose owners are torch-free stay with them:
``tmpq.search.engines.ENGINES``, ``tmpq.search.groups.GROUPINGS``, ``tmpq.search.space.AXES``,
``tmpq.search.executors.EXECUTORS``, ``tmpq.core.schedules.SCHEDULES``."""
from __future__ import annotations

# model.dtype: what the FP model computes in (tmpq.core.model maps each to its torch dtype)
DTYPES = ("fp32", "bf16", "fp16")
# image sizes of the embedded MNIST data (tmpq.core.data)
RESOLUTIONS = (16, 28)
# denoisers tmpq train builds (tmpq.jobs.train)
ARCHS = ("unet", "dit", "mmdit")
# train.objective: what the embedded denoiser learns (tmpq.jobs.train)
OBJECTIVES = ("ddpm", "flow")
# weight quantizers (tmpq.quant): granularity, range observers, rounding, 2-bit weights
GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "percentile", "mse")
ROUNDINGS = ("nearest", "adaround")
TWO_BIT = ("multibasis", "affine")
# supernet.guidance_ranges: one set of activation ranges for both guidance passes, or one for the null pass
GUIDANCE_RANGES = ("shared", "separate")
# supernet.stream_ranges: a joint-attention transformer's image and text projections ranged apart, or tied
STREAM_RANGES = ("separate", "shared")
# calibration.strategy and calibration.mode (tmpq.supernet.calib_data)
STRATEGIES = ("uniform", "ndtc", "eda")
MODES = ("per-option", "random-path")
# named bit options (tmpq profile / calibrate --preset): the same list for weights and activations
BIT_PRESETS = {"paper": (8, 7, 6, 5)}
# apply_export / load_export backend= (alias kernels=), tmpq sample --backend (tmpq.deploy.bundle)
BACKENDS = ("fake", "int8", "torchao", "auto")
