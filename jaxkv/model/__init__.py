"""Llama / Qwen2 / Qwen3 / Mistral-compatible decoder in Flax."""
from jaxkv.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from jaxkv.model.decoder import Decoder, LayerObservation, init_params
from jaxkv.model.model import Model, check_tokens, forward, init_model

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "Decoder", "LayerObservation", "Model",
           "init_params", "init_model", "forward", "check_tokens"]
