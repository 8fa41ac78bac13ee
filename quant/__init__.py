"""Quantizers and quantized layers (torch only, never diffusers). Filled in by the supernet issue."""
