"""FID-digits: the Frechet distance between Gaussians fitted to a small classifier's penultimate features of real
and generated digits (FID's formula, Heusel et al. 2017, with a digits classifier in place of Inception), and the
class accuracy of generated samples as judged by that classifier.

The classifier is an MLP (64 -> 128 -> 64 -> 10, GELU) trained on all of the real digits; its 64 penultimate
features are the embedding. Like FID, the number is comparable only across runs with the same classifier and the
same sample count.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from pangu.config_checks import positive_ints


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Attributes: hidden / feature widths, n_classes, training steps, batch size and learning rate."""

  hidden: int = 128
  features: int = 64
  n_classes: int = 10
  steps: int = 1500
  batch_size: int = 128
  learning_rate: float = 2e-3

  def __post_init__(self):
    positive_ints(self, "hidden", "features", "n_classes", "steps", "batch_size")


class DigitsClassifier(nn.Module):
  """images [B, H, W, 1] -> (logits [B, n_classes], penultimate features [B, features])."""

  config: ClassifierConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.reshape(images.shape[0], -1)
    x = jax.nn.gelu(nn.Dense(self.config.hidden)(x))
    features = jax.nn.gelu(nn.Dense(self.config.features)(x))
    return nn.Dense(self.config.n_classes)(features), features


def train_classifier(config: ClassifierConfig, images: np.ndarray, labels: np.ndarray, rng: jax.Array) -> dict:
  """Params of a classifier trained with Adam and cross-entropy on (images, labels), small Gaussian input noise
  for robustness to imperfect samples."""
  model = DigitsClassifier(config)
  init_rng, rng = jax.random.split(rng)
  params = model.init(init_rng, jnp.zeros((1, *images.shape[1:])))["params"]
  tx = optax.adam(config.learning_rate)
  opt_state = tx.init(params)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, key):
    idx_key, noise_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (config.batch_size,), 0, images.shape[0])
    x = images[idx] + 0.1 * jax.random.normal(noise_key, images[idx].shape)

    def loss(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for key in jax.random.split(rng, config.steps):
    params, opt_state = step(params, opt_state, key)
  return params


def classify(config: ClassifierConfig, params: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(predicted labels [B], penultimate features [B, features]) as float64 NumPy."""
  logits, features = jax.jit(DigitsClassifier(config).apply)({"params": params}, jnp.asarray(images))
  return np.asarray(jnp.argmax(logits, -1)), np.asarray(features, np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to rows of a and b (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b)
  root = np.real(root)
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def paired_fid_gap(a: np.ndarray, b: np.ndarray, reference: np.ndarray, *, resamples: int = 200,
                   level: float = 0.95, seed: int = 0) -> dict[str, float]:
  """FID(a) - FID(b) against `reference`, with a paired-bootstrap interval at `level`.

  Row i of a and b must come from the same sampling noise and label (two models, identical noise). Rows are
  resampled together, so the noise the two share moves both FIDs alike and the interval measures only how far
  the gap itself depends on which samples were drawn. An interval that excludes 0 resolves the order of a and b
  at this sample count; one that holds 0 does not. Returns {"gap", "low", "high"}.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"paired_fid_gap needs paired feature rows of one shape, got {a.shape} and {b.shape}")
  if resamples < 1 or not 0 < level < 1:
    raise ValueError(f"paired_fid_gap: resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
  rng = np.random.default_rng(seed)
  gaps = []
  for _ in range(resamples):
    rows = rng.integers(0, a.shape[0], a.shape[0])
    gaps.append(frechet_distance(a[rows], reference) - frechet_distance(b[rows], reference))
  low, high = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
  return {"gap": frechet_distance(a, reference) - frechet_distance(b, reference), "low": float(low),
          "high": float(high)}


@dataclasses.dataclass(frozen=True)
class DigitsMetric:
  """The classifier and the real digits' features it is compared against."""

  config: ClassifierConfig
  params: dict
  real_features: np.ndarray

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"fid", "class_acc"} of generated images with the labels they were generated for."""
    predicted, features = classify(self.config, self.params, images)
    return {"fid": frechet_distance(features, self.real_features),
            "class_acc": float(np.mean(predicted == np.asarray(labels)))}

  def fid_gap(self, images_a: np.ndarray, images_b: np.ndarray, **bootstrap) -> dict[str, float]:
    """`paired_fid_gap` of two sets of generated images drawn from the same noise and labels."""
    return paired_fid_gap(classify(self.config, self.params, images_a)[1],
                          classify(self.config, self.params, images_b)[1], self.real_features, **bootstrap)


def digits_metric(config: ClassifierConfig, params: dict, real_images: np.ndarray) -> DigitsMetric:
  return DigitsMetric(config, params, classify(config, params, real_images)[1])
