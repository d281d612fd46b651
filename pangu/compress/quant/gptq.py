"""GPTQ weight rounding (Frantar et al. 2023): a linear's kernel rounded one input row at a time, each row's
rounding error pushed onto the rows not yet rounded where the layer's inputs make that cheap.

Round-to-nearest minimises each weight's own error; what matters is the layer's output error on its inputs,
||X W - X Q||^2 = tr((W - Q)^T H (W - Q)) with H = X^T X. Rounding row i moves the output by X[:, i] (w_i - q_i);
the rows after it absorb the part of that move their inputs can express (the optimal brain surgeon update, with
H^-1 restricted to the rows left). GPTQ fixes the order (input order) and reads every update off the upper
Cholesky factor of H^-1, so a [C_in, C_out] kernel costs one factorisation and C_in rank-1 updates. The grid is
round-to-nearest's (symmetric, scales from the float kernel's max|W| per output channel or per tensor), so a model
quantised either way has the same layout, the same bytes and the same integer path.
"""

import numpy as np

from pangu.nn.quantized import weight_qmax

DAMPING = 0.01  # added to H's diagonal, times its mean: keeps the factorisation stable on correlated inputs


def gptq_levels(kernel: np.ndarray, hessian: np.ndarray, bits: int, per_channel: bool = True,
                damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
  """kernel [C_in, C_out], hessian [C_in, C_in] (X^T X of the layer's inputs, up to a factor) -> (integer levels
  [C_in, C_out] in [-qmax, qmax], float, and the grid's scale [1, C_out] or [1, 1]); the rounded kernel is their
  product. An input that is always zero (H_ii = 0) takes no update and passes none on: its row keeps
  round-to-nearest levels.
  """
  w = np.array(kernel, np.float64)
  h = np.array(hessian, np.float64)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"gptq_levels needs kernel [C_in, C_out] and hessian [C_in, C_in], got {w.shape} and {h.shape}")
  qmax = weight_qmax(bits)
  scale = np.maximum(np.max(np.abs(w), axis=0 if per_channel else None, keepdims=True), 1e-12) / qmax
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h += damping * np.mean(np.diag(h)) * np.eye(len(h))
  # Upper factor U of H^-1 = U^T U: row i of U holds the updates of rounding row i given the rows before it.
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  levels = np.zeros_like(w)
  for i in range(w.shape[0]):
    levels[i] = np.clip(np.round(w[i] / scale[0]), -qmax, qmax)
    error = (w[i] - levels[i] * scale[0]) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], error)
  return levels, scale
