"""The weight-sharing quantized supernet over a diffusers denoiser."""
from tmpq.supernet.config import LayerInfo, SupernetConfig
from tmpq.supernet.supernet import QuantSupernet, model_fingerprint

__all__ = ["LayerInfo", "QuantSupernet", "SupernetConfig", "model_fingerprint"]
