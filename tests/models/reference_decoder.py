"""An independent float64 NumPy decoder (Llama layout + sandwich norms) to check the JAX model against."""

import numpy as np
from scipy.special import erf


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
  """x [S, N, Dh]; pairs are (i, i + Dh/2) (rotate-half layout)."""
  dh = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
  ang = positions[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  a, b = x[..., : dh // 2], x[..., dh // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def attention(x, p, n_heads, n_kv, theta, eps, qk_norm, bias, positions):
  """Causal by position: token i sees token j iff positions[j] <= positions[i]."""
  q = np.einsum("sd,dnh->snh", x, p["q"])
  k = np.einsum("sd,dnh->snh", x, p["k"])
  v = np.einsum("sd,dnh->snh", x, p["v"])
  if bias:
    q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
  if qk_norm:
    q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
  pos = np.asarray(positions, np.float64)
  q, k = rope(q, pos, theta), rope(k, pos, theta)
  group = n_heads // n_kv
  out = np.zeros_like(q)
  for h in range(n_heads):
    scores = q[:, h] @ k[:, h // group].T / np.sqrt(q.shape[-1])
    scores = np.where(pos[None, :] <= pos[:, None], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[:, h] = w @ v[:, h // group]
  return np.einsum("snh,nhd->sd", out, p["o"])


def silu(x):
  return x / (1 + np.exp(-x))


def gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def mlp(x, p):
  if "gate" in p:
    return (silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
  return gelu(x @ p["up"]) @ p["down"]


def lookup_experts(u, e, p, eps):
  """MoLE: softmax(u R) over all experts, each a GELU MLP of the normed embedding output e."""
  logits = u @ p["router"]
  g = np.exp(logits - logits.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  e = rms_norm(e, p["expert_norm"]["scale"], eps)
  return sum(g[:, j, None] * (gelu(e @ p["up"][j]) @ p["down"][j]) for j in range(p["up"].shape[0]))


def decoder_logits(cfg, params, tokens, keep=None):
  """tokens [S] -> logits [S, V], params in the unrolled layout, all float64.

  keep: optional {layer i: indices into the tokens still present}: the tokens not listed are dropped before
  layer i (token pruning); the others keep their positions. The logits are those of the tokens left.
  """
  p = {k: v for k, v in params.items()}
  x = embedded = p["embedding"][tokens]
  positions = np.arange(len(tokens))
  for i in range(cfg.n_layers):
    if keep and i in keep:
      x, embedded, positions = x[keep[i]], embedded[keep[i]], positions[keep[i]]
    lp = p[f"layer_{i}"]
    shape = cfg.layer(i)
    h = attention(rms_norm(x, lp["pre_attn_norm"]["scale"], cfg.norm_eps), lp["attn"], shape.n_heads,
                  shape.n_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.qk_norm, cfg.attention_bias, positions)
    if cfg.norm_placement != "pre":
      h = rms_norm(h, lp["post_attn_norm"]["scale"], cfg.norm_eps)
    x = x + h
    m = rms_norm(x, lp["pre_mlp_norm"]["scale"], cfg.norm_eps)
    h = mlp(m, lp["mlp"])
    if "mole" in lp:
      h = h + lookup_experts(m, embedded, lp["mole"], cfg.norm_eps)
    if cfg.norm_placement != "pre":
      h = rms_norm(h, lp["post_mlp_norm"]["scale"], cfg.norm_eps)
    x = x + h
  x = rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
  head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head
