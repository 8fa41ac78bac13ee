"""Quantizers and quantized layers (torch only, never diffusers)."""
from quant.functional import fake_quant, qrange, round_ste
from quant.quantizer import AffineQuantizer, QuantError

__all__ = ["AffineQuantizer", "QuantError", "fake_quant", "qrange", "round_ste"]
