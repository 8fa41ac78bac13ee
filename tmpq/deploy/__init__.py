"""Deployment: the export bundle format (reading it, applying it to a stock diffusers pipeline) and CPU int8 kernels
checked against fake quantization. Above the libraries, below the jobs. See ARCHITECTURE.md."""
