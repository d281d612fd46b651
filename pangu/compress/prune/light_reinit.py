"""Pangu Light's weight re-initialisations as pure array math (arXiv 2505.20155; spec shared/specs/pangu_light.md).

Three formulas, each independent of the model code so that tests can hold them against a NumPy reference:
  - post-norm absorption (spec 3.2): the constant c that best replaces a sandwich post-norm's 1 / RMS(z), and the
    fold of c * gamma_post into the output kernel before it;
  - CLAP (spec 3.3): the attention (or FFN) units of a removed layer pooled with its recipient's, the best kept,
    their input weights rescaled by the ratio of the two layers' pre-norm gains;
  - SLNP (spec 3.5): an RMSNorm gain re-scaled after hidden channels are removed.
Only the abstract of the paper is public: the formulas are the spec's reconstruction, each behind a flag.
"""

import dataclasses

import numpy as np

ABSORB_METHODS = ("const_lstsq", "const_mean", "drop", "none")
SLNP_MODES = ("l2", "sqrt_ratio", "none")
GROUP_NORMS = ("raw", "per_layer_sum")
NORM_FOLDS = ("ratio", "none")
# |gamma| below this is treated as this (sign kept) in a gain ratio, so a dead channel cannot blow a weight up.
RATIO_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class AbsorbStats:
  """Calibration sums of one post-norm's input z (spec 3.2), over tokens t: a_t = gamma_post * z_t and
  r_t = RMS(z_t) = sqrt(mean(z_t^2) + eps)."""

  a2_over_r: float  # sum_t ||a_t||^2 / r_t
  a2: float  # sum_t ||a_t||^2
  inv_r: float  # sum_t 1 / r_t
  r: float  # sum_t r_t
  r2: float  # sum_t r_t^2
  count: int

  @property
  def rms_cv(self) -> float:
    """Coefficient of variation of r_t over the calibration tokens: 0 makes the fold exact."""
    mean = self.r / self.count
    return float(np.sqrt(max(self.r2 / self.count - mean ** 2, 0.0)) / mean)

  def coefficient(self, method: str) -> float:
    """c of `gamma_post * z / RMS(z) ~ c * gamma_post * z`: least squares over the calibration tokens
    (const_lstsq), the mean of 1 / r_t (const_mean), or 1 (drop: the norm is deleted and KD recovers)."""
    if method == "const_lstsq":
      return self.a2_over_r / self.a2 if self.a2 > 0 else self.inv_r / self.count
    if method == "const_mean":
      return self.inv_r / self.count
    if method == "drop":
      return 1.0
    raise ValueError(f"absorb must be one of {ABSORB_METHODS[:3]} to fold a post-norm, got {method!r}")


def absorb_stats(z: np.ndarray, gamma_post: np.ndarray, eps: float) -> AbsorbStats:
  """The sums of `AbsorbStats` for post-norm inputs z [n, D] (float64)."""
  z = np.asarray(z, np.float64)
  r = np.sqrt(np.mean(z ** 2, axis=-1) + eps)
  a2 = np.sum((np.asarray(gamma_post, np.float64) * z) ** 2, axis=-1)
  return AbsorbStats(float(np.sum(a2 / r)), float(np.sum(a2)), float(np.sum(1 / r)), float(np.sum(r)),
                     float(np.sum(r ** 2)), int(z.shape[0]))


def fold_post_norm(kernel: np.ndarray, bias: np.ndarray | None, gamma_post: np.ndarray, c: float,
                   method: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(kernel [..., D], bias [D] or None) with `c * gamma_post` folded into the output channels, so the sub-block
  adds `c * gamma_post * z` and the post-norm can be deleted. `drop` deletes the norm without folding anything."""
  scale = np.ones_like(gamma_post) if method == "drop" else c * np.asarray(gamma_post)
  return kernel * scale, None if bias is None else bias * scale


def gain_ratio(source: np.ndarray, recipient: np.ndarray) -> np.ndarray:
  """source / recipient per channel, the recipient's |gamma| floored at RATIO_FLOOR with its sign kept."""
  recipient = np.asarray(recipient, np.float64)
  floor = np.where(recipient < 0, -RATIO_FLOOR, RATIO_FLOOR)
  safe = np.where(np.abs(recipient) < RATIO_FLOOR, floor, recipient)
  return np.asarray(source, np.float64) / safe


def pooled_units(importances: list[np.ndarray], keep: int, group_norm: str) -> list[tuple[int, int]]:
  """CLAP's choice (spec 3.3 step 2): the `keep` most important (source, unit) pairs over the recipient (source
  0) and its donors, in source-then-unit order, so that with no donors it is plain per-layer top-k.
  `per_layer_sum` divides each source's importances by their sum before pooling."""
  if group_norm not in GROUP_NORMS:
    raise ValueError(f"clap_group_norm must be one of {GROUP_NORMS}, got {group_norm!r}")
  pool = []
  for s, imp in enumerate(importances):
    imp = np.asarray(imp, np.float64)
    if group_norm == "per_layer_sum":
      imp = imp / max(float(imp.sum()), 1e-30)
    pool += [(-float(v), s, u) for u, v in enumerate(imp)]
  total = sum(len(i) for i in importances)
  if not 0 < keep <= total:
    raise ValueError(f"cannot keep {keep} units out of {total}")
  return sorted((s, u) for _, s, u in sorted(pool)[:keep])


def merge_attention(sources: list[dict], pre_gains: list[np.ndarray], post_gains: list[np.ndarray] | None,
                    chosen: list[tuple[int, int]], group_size: int) -> dict:
  """CLAP's re-initialised attention (spec 3.3 steps 3-4) of the recipient, `sources[0]`, from the KV groups
  `chosen` [(source, group)] of the sources' attention params (q [D, H, Dh], k / v [D, K, Dh], o [H, Dh, D],
  optional per-head biases; q_norm / k_norm and o_bias stay the recipient's):
    W_{q,k,v}[d, :] of a group from source s  *= gamma_pre_s[d] / gamma_pre_0[d]
    W_o[:, :, d] of its query heads            *= gamma_post_s[d] / gamma_post_0[d]   (post_gains not None)
  """
  recipient = sources[0]
  out = {k: v for k, v in recipient.items() if k in ("q_norm", "k_norm", "o_bias")}
  parts = {name: [] for name in recipient if name not in out}
  for s, g in chosen:
    src = sources[s]
    in_scale = 1.0 if s == 0 else gain_ratio(pre_gains[s], pre_gains[0])[:, None, None]
    out_scale = 1.0 if s == 0 or post_gains is None else gain_ratio(post_gains[s], post_gains[0])
    heads = slice(g * group_size, (g + 1) * group_size)
    for name in ("q", "k", "v"):
      index = heads if name == "q" else slice(g, g + 1)
      parts[name].append(np.asarray(src[name], np.float64)[:, index] * in_scale)
      if f"{name}_bias" in parts:
        parts[f"{name}_bias"].append(np.asarray(src[f"{name}_bias"], np.float64)[index])
    parts["o"].append(np.asarray(src["o"], np.float64)[heads] * out_scale)
  axis = {"q": 1, "k": 1, "v": 1}
  for name, pieces in parts.items():
    out[name] = np.concatenate(pieces, axis=axis.get(name, 0)).astype(np.asarray(recipient[name]).dtype)
  return out


def merge_mlp(sources: list[dict], pre_gains: list[np.ndarray], post_gains: list[np.ndarray] | None,
              chosen: list[tuple[int, int]]) -> dict:
  """CLAP's `clap_ffn="merge"`: the FFN neurons `chosen` [(source, neuron)] pooled like attention groups
  (gate / up [D, F] columns with the pre-norm ratio on their rows, down [F, D] rows with the post-norm ratio;
  down_bias stays the recipient's)."""
  recipient = sources[0]
  out = {k: v for k, v in recipient.items() if k == "down_bias"}
  parts = {name: [] for name in recipient if name not in out}
  for s, i in chosen:
    src = sources[s]
    in_scale = 1.0 if s == 0 else gain_ratio(pre_gains[s], pre_gains[0])
    out_scale = 1.0 if s == 0 or post_gains is None else gain_ratio(post_gains[s], post_gains[0])
    for name in ("gate", "up"):
      if name in parts:
        parts[name].append(np.asarray(src[name], np.float64)[:, i:i + 1] * np.reshape(in_scale, (-1, 1)))
      if f"{name}_bias" in parts:
        parts[f"{name}_bias"].append(np.asarray(src[f"{name}_bias"], np.float64)[i:i + 1])
    parts["down"].append(np.asarray(src["down"], np.float64)[i:i + 1] * out_scale)
  for name, pieces in parts.items():
    out[name] = np.concatenate(pieces, axis=1 if name in ("gate", "up") else 0).astype(
        np.asarray(recipient[name]).dtype)
  return out


def slnp_gain(gamma: np.ndarray, kept: np.ndarray, mode: str) -> np.ndarray:
  """SLNP (spec 3.5): the gain of an RMSNorm over the kept hidden channels `kept` of D.
    l2:         gamma_K * ||gamma||_2 / ||gamma_K||_2   (left as gamma_K when ||gamma_K|| = 0)
    sqrt_ratio: gamma_K * sqrt(D / D')
    none:       gamma_K (plain truncation)
  """
  gamma = np.asarray(gamma)
  kept_gamma = gamma[kept].astype(np.float64)
  if mode == "none":
    scale = 1.0
  elif mode == "l2":
    kept_norm = float(np.linalg.norm(kept_gamma))
    scale = float(np.linalg.norm(gamma.astype(np.float64))) / kept_norm if kept_norm > 0 else 1.0
  elif mode == "sqrt_ratio":
    scale = float(np.sqrt(gamma.shape[0] / len(kept)))
  else:
    raise ValueError(f"slnp must be one of {SLNP_MODES}, got {mode!r}")
  return (kept_gamma * scale).astype(gamma.dtype)
