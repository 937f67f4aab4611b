"""Compatibility with OpenAI's guided-diffusion: its factories, flags and checkpoints."""

from gdiff.checkpoints.torch_file import load_torch_state_dict
from gdiff.compat.convert import convert_state_dict

__all__ = ["convert_state_dict", "load_torch_state_dict"]
