"""Flax ADM networks (NHWC). Modules take explicit attributes and never read a config."""

from gdiff.models.attention import AttentionBlock, AttentionPool2d, qkv_attention
from gdiff.models.layers import timestep_embedding
from gdiff.models.unet import EncoderUNetModel, ResBlock, SuperResModel, UNetModel

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "EncoderUNetModel",
    "ResBlock",
    "SuperResModel",
    "UNetModel",
    "qkv_attention",
    "timestep_embedding",
]
