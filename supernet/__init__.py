"""The weight-sharing quantized supernet over a diffusers denoiser."""
from supernet.config import LayerInfo, SupernetConfig
from supernet.supernet import QuantSupernet, model_fingerprint

__all__ = ["LayerInfo", "QuantSupernet", "SupernetConfig", "model_fingerprint"]
