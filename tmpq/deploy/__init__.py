"""Deployment: the export bundle format (reading it, applying it to a stock diffusers pipeline), its quantization
plan, tmpq's own pipeline for the exports no stock pipeline samples, and int8 kernels checked against fake
quantization. Above the libraries, below the jobs. See ARCHITECTURE.md."""
# registers TmpqPipeline with diffusers, so that DiffusionPipeline.from_pretrained(EXPORT) resolves it
from tmpq.deploy import pipelines as pipelines  # noqa: E402
