"""tmpq: timestep x mixed-precision co-optimisation of diffusion models."""
__version__ = "0.1.0"
