"""FID-digits: the Frechet distance between Gaussians fitted to a small classifier's penultimate features of real
and generated digits (FID's formula, Heusel et al. 2017, with a digits classifier in place of Inception), and the
class accuracy of generated samples as judged by that classifier.

The classifier is an MLP (64 -> 128 -> 64 -> 10, GELU) trained on all of the real digits; its 64 penultimate
features are the embedding. Like FID, the number is comparable only across runs with the same classifier and the
same sample count.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


@functools.partial(jax.jit, static_argnums=0)
def _predict(config: ClassifierConfig, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits, features = DigitsClassifier(config).apply({"params": params}, images)
  return jnp.argmax(logits, -1), features


def classify(config: ClassifierConfig, params: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(predicted labels [B], penultimate features [B, features]) as float64 NumPy."""
  predicted, features = _predict(config, params, jnp.asarray(images))
  return np.asarray(predicted), np.asarray(features, np.float64)


@dataclasses.dataclass(frozen=True)
class FeatureGaussian:
  """A Gaussian fitted to feature rows (float64), with the symmetric square root of its covariance: the FIDs of
  many sample sets against one reference (the real digits, in every bootstrap resample) share it."""

  mean: np.ndarray
  cov: np.ndarray
  cov_root: np.ndarray


def fit_gaussian(features: np.ndarray) -> FeatureGaussian:
  """The Gaussian of feature rows [N, d]: mean, covariance and its root from the symmetric eigendecomposition."""
  features = np.asarray(features, np.float64)
  cov = np.cov(features, rowvar=False)
  values, vectors = np.linalg.eigh(cov)
  return FeatureGaussian(features.mean(0), cov, (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T)


def frechet_distance_to(a: np.ndarray, reference: FeatureGaussian) -> float:
  """||mu_a - mu_r||^2 + tr(S_a + S_r - 2 (S_a S_r)^(1/2)) of a Gaussian fitted to rows of a and the reference."""
  a = np.asarray(a, np.float64)
  return float(_frechet(a.mean(0)[None], np.cov(a, rowvar=False)[None], reference)[0])


def _frechet(means: np.ndarray, covs: np.ndarray, reference: FeatureGaussian) -> np.ndarray:
  """[R] Frechet distances of R Gaussians (means [R, d], covs [R, d, d]) to the reference.

  S_a S_r is similar to R S_a R (R = S_r^(1/2)), which is symmetric positive semi-definite, so the trace of
  (S_a S_r)^(1/2) is the sum of the square roots of R S_a R's eigenvalues: no general matrix square root (FID's
  usual scipy.linalg.sqrtm, several times slower at 64 features) and no imaginary round-off to drop.
  """
  root = reference.cov_root
  cross = np.sqrt(np.maximum(np.linalg.eigvalsh(root @ covs @ root), 0.0)).sum(-1)
  return (np.sum((means - reference.mean) ** 2, -1) + np.trace(covs, axis1=-2, axis2=-1) + np.trace(reference.cov)
          - 2 * cross)


def _resampled_frechet(x: np.ndarray, counts: np.ndarray, reference: FeatureGaussian, block: int = 2048
                       ) -> np.ndarray:
  """[R] `frechet_distance_to` of R bootstrap resamples of x's rows (counts [R, n]: each row's multiplicity), from
  products with the rows' outer products (blocks of `block` rows) instead of R gathered copies."""
  n, d = x.shape
  means = counts @ x / n
  second = sum(counts[:, i:i + block] @ (x[i:i + block, :, None] * x[i:i + block, None, :]).reshape(-1, d * d)
               for i in range(0, n, block)).reshape(-1, d, d) / n
  covs = (second - means[:, :, None] * means[:, None, :]) * (n / (n - 1))
  return _frechet(means, covs, reference)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Frechet distance of Gaussians fitted to rows of a and b (float64); see `frechet_distance_to`."""
  return frechet_distance_to(a, fit_gaussian(b))


def paired_fid_gap(a: np.ndarray, b: np.ndarray, reference: np.ndarray | FeatureGaussian, *, resamples: int = 200,
                   level: float = 0.95, seed: int = 0) -> dict[str, float]:
  """FID(a) - FID(b) against `reference` (feature rows, or the Gaussian fitted to them), with a paired-bootstrap
  interval at `level`.

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
  if not isinstance(reference, FeatureGaussian):
    reference = fit_gaussian(reference)
  rng = np.random.default_rng(seed)
  n = a.shape[0]
  counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(np.float64)
  gaps = _resampled_frechet(a, counts, reference) - _resampled_frechet(b, counts, reference)
  low, high = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
  return {"gap": frechet_distance_to(a, reference) - frechet_distance_to(b, reference), "low": float(low),
          "high": float(high)}


@dataclasses.dataclass(frozen=True)
class DigitsMetric:
  """The classifier and the Gaussian of the real digits' features it compares against."""

  config: ClassifierConfig
  params: dict
  real: FeatureGaussian

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"fid", "class_acc"} of generated images with the labels they were generated for."""
    predicted, features = classify(self.config, self.params, images)
    return {"fid": frechet_distance_to(features, self.real),
            "class_acc": float(np.mean(predicted == np.asarray(labels)))}

  def fid_gap(self, images_a: np.ndarray, images_b: np.ndarray, **bootstrap) -> dict[str, float]:
    """`paired_fid_gap` of two sets of generated images drawn from the same noise and labels."""
    return paired_fid_gap(classify(self.config, self.params, images_a)[1],
                          classify(self.config, self.params, images_b)[1], self.real, **bootstrap)


def digits_metric(config: ClassifierConfig, params: dict, real_images: np.ndarray) -> DigitsMetric:
  return DigitsMetric(config, params, fit_gaussian(classify(config, params, real_images)[1]))
