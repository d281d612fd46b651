"""The embedded default data: scikit-learn's 8x8 handwritten digits (1797 images, values 0..16, 10 classes),
shipped with the package, so nothing is downloaded."""

import jax
import jax.numpy as jnp
import numpy as np


def load_digits_images(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, size, size, 1] in [-1, 1], labels int32 [N]); size 16 upsamples bilinearly."""
  from sklearn.datasets import load_digits
  data = load_digits()
  images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  if size != 8:
    if size < 8:
      raise ValueError(f"load_digits_images: size must be >= 8, got {size}")
    images = np.asarray(jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, 1), "bilinear"))
  return images, data.target.astype(np.int32)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """[-1, 1] model space -> [0, 1] for display."""
  return np.clip((np.asarray(images) + 1) / 2, 0, 1)
