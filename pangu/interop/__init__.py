"""Checkpoints from and to other ecosystems (Hugging Face safetensors folders)."""

from pangu.interop.hf import CheckpointFormatError, config_from_hf, config_to_hf, load_pretrained, save_pretrained

__all__ = ["CheckpointFormatError", "config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]
