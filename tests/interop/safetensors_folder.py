"""Every tensor of a saved Hugging Face folder, for the tests that compare folders tensor by tensor."""

import os

import numpy as np
from safetensors import safe_open


def folder_tensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """HF tensor name -> array, over all of the folder's safetensors files (one or shards)."""
  out = {}
  for file in sorted(os.listdir(folder)):
    if file.endswith(".safetensors"):
      with safe_open(os.path.join(folder, file), framework="np") as f:
        out.update({name: f.get_tensor(name) for name in f.keys()})
  return out
