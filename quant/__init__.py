"""Quantizers and quantized layers (torch only, never diffusers)."""
from tmpq.quant.functional import fake_quant, qrange, round_ste
from tmpq.quant.quantizer import AffineQuantizer, QuantError

__all__ = ["AffineQuantizer", "QuantError", "fake_quant", "qrange", "round_ste"]
