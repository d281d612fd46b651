"""openPangu folders: tiny random checkpoints in the published formats load, give the logits of a float64 NumPy
reference of the published forward pass, generate, save back bit for bit, and name what they cannot hold."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from pangu import models
from pangu.infer import decoding
from pangu.interop.hf import CheckpointFormatError, load_pretrained, save_pretrained
from pangu.models.transformer import Decoder

ULTRA = {
    "sandwich_first_dense": dict(attention_q_lora_dim=16, sandwich_norm=True, num_dense_layers=1),
    "pre_norm_no_q_lora": dict(attention_q_lora_dim=None, sandwich_norm=False, num_dense_layers=0),
}


def ultra_config(**overrides) -> dict:
  base = dict(architectures=["PanguUltraMoEForCausalLM"], model_type="pangu_ultra_moe", vocab_size=64,
              hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
              attention_q_lora_dim=16, attention_kv_lora_dim=12, attention_qk_dim=8, attention_qk_rope_dim=4,
              attention_v_dim=6, num_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              num_shared_experts=1, num_dense_layers=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              sandwich_norm=True, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
              tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
  return {**base, **overrides}


def pro_config(**overrides) -> dict:
  base = dict(architectures=["PanguProMoEForCausalLM"], model_type="PanguProMoE", vocab_size=64, hidden_size=32,
              intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              num_experts=8, num_experts_per_tok=4, moe_intermediate_size=8, shared_expert_intermediate_size=16,
              mlp_only_layers=[0], hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_theta=16000000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  return {**base, **overrides}


def embedded_config(**overrides) -> dict:
  base = dict(architectures=["PanguEmbeddedForCausalLM"], model_type="PanguEmbedded", vocab_size=64, hidden_size=32,
              intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=16000000.0, bias=True,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  return {**base, **overrides}


def _mlp_tensors(rng, prefix, d, f):
  return {f"{prefix}.gate_proj.weight": rng.normal(0, 0.2, (f, d)), f"{prefix}.up_proj.weight": rng.normal(0, 0.2, (f, d)),
          f"{prefix}.down_proj.weight": rng.normal(0, 0.2, (d, f))}


def random_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Every tensor the published modeling code builds for `hf`, random (norm gains near 1)."""
  rng = np.random.default_rng(seed)
  d, v, h = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
  gain = lambda n: 1 + 0.1 * rng.normal(size=n)
  t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (v, d)), "model.norm.weight": gain(d),
       "lm_head.weight": rng.normal(0, 0.2, (v, d))}
  mtp = hf.get("num_mtp_layers") or 0
  for i in range(hf["num_hidden_layers"] + mtp):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = gain(d)
    t[p + "post_attention_layernorm.weight"] = gain(d)
    if "num_key_value_heads" in hf:  # Embedded, Pro MoE: Llama layout with q/k/v/o biases
      dh, kv = d // h, hf["num_key_value_heads"]
      for name, rows in (("q", h * dh), ("k", kv * dh), ("v", kv * dh)):
        t[p + f"self_attn.{name}_proj.weight"] = rng.normal(0, 0.2, (rows, d))
        t[p + f"self_attn.{name}_proj.bias"] = rng.normal(0, 0.2, rows)
      t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (d, h * dh))
      t[p + "self_attn.o_proj.bias"] = rng.normal(0, 0.2, d)
      if "num_experts" in hf and i not in hf["mlp_only_layers"]:
        t[p + "mlp.gate.weight"] = rng.normal(0, 0.5, (hf["num_experts"], d))
        t[p + "mlp.router_scale"] = 1 + 0.2 * rng.normal(size=(1, hf["num_experts"]))
        for j in range(hf["num_experts"]):
          t.update(_mlp_tensors(rng, p + f"mlp.experts.{j}", d, hf["moe_intermediate_size"]))
        t.update(_mlp_tensors(rng, p + "mlp.shared_expert", d, hf["shared_expert_intermediate_size"]))
      else:
        t.update(_mlp_tensors(rng, p + "mlp", d, hf["intermediate_size"]))
      continue
    q_lora, r = hf["attention_q_lora_dim"], hf["attention_kv_lora_dim"]
    qk, rope, vd = hf["attention_qk_dim"], hf["attention_qk_rope_dim"], hf["attention_v_dim"]
    if q_lora is None:
      t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (h * (qk + rope), d))
    else:
      t[p + "self_attn.q_a_proj.weight"] = rng.normal(0, 0.2, (q_lora, d))
      t[p + "self_attn.q_a_layernorm.weight"] = gain(q_lora)
      t[p + "self_attn.q_b_proj.weight"] = rng.normal(0, 0.3, (h * (qk + rope), q_lora))
    t[p + "self_attn.kv_a_proj_with_mqa.weight"] = rng.normal(0, 0.2, (r + rope, d))
    t[p + "self_attn.kv_a_layernorm.weight"] = gain(r)
    t[p + "self_attn.kv_b_proj.weight"] = rng.normal(0, 0.3, (h * (qk + vd), r))
    t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (d, h * vd))
    if hf["sandwich_norm"]:
      t[p + "pre_mlp_layernorm.weight"] = gain(d)
      t[p + "post_mlp_layernorm.weight"] = gain(d)
    if i < hf["num_dense_layers"]:
      t.update(_mlp_tensors(rng, p + "mlp", d, hf["intermediate_size"]))
    else:
      t[p + "mlp.gate.weight"] = rng.normal(0, 0.5, (hf["num_routed_experts"], d))
      for j in range(hf["num_routed_experts"]):
        t.update(_mlp_tensors(rng, p + f"mlp.experts.{j}", d, hf["moe_intermediate_size"]))
      t.update(_mlp_tensors(rng, p + "mlp.shared_experts", d, hf["moe_intermediate_size"] * hf["num_shared_experts"]))
    if i >= hf["num_hidden_layers"]:  # the MTP layer: DeepSeek-V3's names, copies of the shared embedding and head
      t.update({p + "enorm.weight": gain(d), p + "hnorm.weight": gain(d), p + "shared_head.norm.weight": gain(d),
                p + "eh_proj.weight": rng.normal(0, 0.2, (d, 2 * d)),
                p + "embed_tokens.weight": t["model.embed_tokens.weight"], p + "shared_head.head.weight": t["lm_head.weight"]})
  return {k: np.asarray(x, np.float32) for k, x in t.items()}


def write_folder(path, hf: dict, tensors: dict) -> str:
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  return str(path)


def _read_folder(path) -> dict[str, np.ndarray]:
  with safe_open(os.path.join(path, "model.safetensors"), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------------------
# The published forward pass in float64 (one sequence, positions 0..S-1).


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rotate_half_rope(x, theta):
  """x [H, S, P]; rotate-half RoPE with cos/sin of cat(freqs, freqs) (transformers' Llama)."""
  p = x.shape[-1]
  freqs = np.outer(np.arange(x.shape[-2]), 1.0 / theta ** (np.arange(0, p, 2) / p))
  cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
  rotated = np.concatenate([-x[..., p // 2:], x[..., :p // 2]], -1)
  return x * cos + rotated * sin


def _attention(q, k, v, scale):
  """q, k [H, S, Dqk], v [H, S, Dv], causal -> [S, H * Dv]."""
  s = q.shape[1]
  scores = q @ k.transpose(0, 2, 1) * scale + np.triu(np.full((s, s), -np.inf), 1)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return (probs @ v).transpose(1, 0, 2).reshape(s, -1)


def _mlp(x, t, prefix):
  silu = lambda a: a / (1 + np.exp(-a))
  return (silu(x @ t[f"{prefix}.gate_proj.weight"].T) * (x @ t[f"{prefix}.up_proj.weight"].T)) @ t[
      f"{prefix}.down_proj.weight"].T


def _mla(x, t, p, hf):
  s, h = x.shape[0], hf["num_attention_heads"]
  qk, rope, r = hf["attention_qk_dim"], hf["attention_qk_rope_dim"], hf["attention_kv_lora_dim"]
  if hf["attention_q_lora_dim"] is None:
    q = x @ t[p + "self_attn.q_proj.weight"].T
  else:
    q_a = _rms(x @ t[p + "self_attn.q_a_proj.weight"].T, t[p + "self_attn.q_a_layernorm.weight"], hf["rms_norm_eps"])
    q = q_a @ t[p + "self_attn.q_b_proj.weight"].T
  q = q.reshape(s, h, qk + rope).transpose(1, 0, 2)
  latent = x @ t[p + "self_attn.kv_a_proj_with_mqa.weight"].T
  kv = _rms(latent[:, :r], t[p + "self_attn.kv_a_layernorm.weight"], hf["rms_norm_eps"]) @ t[
      p + "self_attn.kv_b_proj.weight"].T
  kv = kv.reshape(s, h, -1).transpose(1, 0, 2)
  deinterleave = lambda a: np.concatenate([a[..., 0::2], a[..., 1::2]], -1)  # the code's view(d/2, 2).transpose
  q_pe = _rotate_half_rope(deinterleave(q[..., qk:]), hf["rope_theta"])
  k_pe = _rotate_half_rope(deinterleave(latent[None, :, r:]), hf["rope_theta"])
  query = np.concatenate([q[..., :qk], q_pe], -1)
  key = np.concatenate([kv[..., :qk], np.broadcast_to(k_pe, (h, s, rope))], -1)
  out = _attention(query, key, kv[..., qk:], (qk + rope) ** -0.5)
  return out @ t[p + "self_attn.o_proj.weight"].T


def _moe(x, t, p, hf):
  scores = 1 / (1 + np.exp(-(x @ t[p + "mlp.gate.weight"].T)))
  out = _mlp(x, t, p + "mlp.shared_experts")
  for row in range(x.shape[0]):
    chosen = np.argsort(-scores[row], kind="stable")[:hf["num_experts_per_tok"]]
    weights = scores[row, chosen] / (scores[row, chosen].sum() + 1e-20) * hf["routed_scaling_factor"]
    for j, w in zip(chosen, weights):
      out[row] += w * _mlp(x[row:row + 1], t, p + f"mlp.experts.{j}")[0]
  return out


def _moge(x, t, p, hf):
  """Pro MoE: softmax over all experts, the best of each of K groups of N / K, times router_scale."""
  logits = x @ t[p + "mlp.gate.weight"].T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  n, k = hf["num_experts"], hf["num_experts_per_tok"]
  out = _mlp(x, t, p + "mlp.shared_expert")
  for row in range(x.shape[0]):
    for g in range(k):
      j = g * (n // k) + int(np.argmax(probs[row, g * (n // k):(g + 1) * (n // k)]))
      w = probs[row, j] * t[p + "mlp.router_scale"][0, j]
      out[row] += w * _mlp(x[row:row + 1], t, p + f"mlp.experts.{j}")[0]
  return out


def _embedded_attention(x, t, p, hf):
  s, h, kv = x.shape[0], hf["num_attention_heads"], hf["num_key_value_heads"]
  proj = lambda name, n: (x @ t[p + f"self_attn.{name}_proj.weight"].T + t[p + f"self_attn.{name}_proj.bias"]
                          ).reshape(s, n, -1).transpose(1, 0, 2)
  q, k, v = proj("q", h), proj("k", kv), proj("v", kv)
  k, v = np.repeat(k, h // kv, 0), np.repeat(v, h // kv, 0)
  out = _attention(_rotate_half_rope(q, hf["rope_theta"]), _rotate_half_rope(k, hf["rope_theta"]), v,
                   q.shape[-1] ** -0.5)
  return out @ t[p + "self_attn.o_proj.weight"].T + t[p + "self_attn.o_proj.bias"]


def _layer(x, t, i, hf):
  """Decoder layer i (model.layers.i) of the published code."""
  p, eps = f"model.layers.{i}.", hf["rms_norm_eps"]
  norm = lambda y, name: _rms(y, t[p + name + ".weight"], eps)
  if "num_key_value_heads" in hf:
    x = x + _embedded_attention(norm(x, "input_layernorm"), t, p, hf)
    u = norm(x, "post_attention_layernorm")
    moge = "num_experts" in hf and i not in hf["mlp_only_layers"]
    return x + (_moge(u, t, p, hf) if moge else _mlp(u, t, p + "mlp"))
  h = _mla(norm(x, "input_layernorm"), t, p, hf)
  sandwich = hf["sandwich_norm"]
  x = x + (norm(h, "post_attention_layernorm") if sandwich else h)
  u = norm(x, "pre_mlp_layernorm" if sandwich else "post_attention_layernorm")
  h = _mlp(u, t, p + "mlp") if i < hf["num_dense_layers"] else _moe(u, t, p, hf)
  return x + (norm(h, "post_mlp_layernorm") if sandwich else h)


def _last_hidden(hf, t, tokens):
  """The last decoder layer's output [S, D], before model.norm."""
  x = t["model.embed_tokens.weight"][tokens]
  for i in range(hf["num_hidden_layers"]):
    x = _layer(x, t, i, hf)
  return x


def _float64(tensors):
  return {k: np.asarray(x, np.float64) for k, x in tensors.items()}


def reference_logits(hf: dict, tensors: dict, tokens: np.ndarray) -> np.ndarray:
  t = _float64(tensors)
  return _rms(_last_hidden(hf, t, tokens), t["model.norm.weight"], hf["rms_norm_eps"]) @ t["lm_head.weight"].T


def reference_mtp_logits(hf: dict, tensors: dict, tokens: np.ndarray) -> np.ndarray:
  """The MTP layer's logits [S - 1, V] (DeepSeek-V3 layout, as omni-infer's pangu_ultra_moe_mtp.py runs it):
  position s reads the main model's last hidden state h_s and the embedding of token s+1, through enorm, hnorm,
  eh_proj([e; h]), decoder layer L, shared_head.norm and shared_head.head; it predicts token s+2."""
  t, eps, n = _float64(tensors), hf["rms_norm_eps"], hf["num_hidden_layers"]
  p = f"model.layers.{n}."
  hidden = _rms(_last_hidden(hf, t, tokens)[:-1], t[p + "hnorm.weight"], eps)
  embedded = _rms(t[p + "embed_tokens.weight"][tokens[1:]], t[p + "enorm.weight"], eps)
  x = _layer(np.concatenate([embedded, hidden], -1) @ t[p + "eh_proj.weight"].T, t, n, hf)
  return _rms(x, t[p + "shared_head.norm.weight"], eps) @ t[p + "shared_head.head.weight"].T


# ----------------------------------------------------------------------------------------------------------

TOKENS = np.array([3, 17, 42, 5, 9, 60, 1, 33, 8, 21], np.int32)
FORMATS = {**{f"ultra_{k}": ultra_config(**v) for k, v in ULTRA.items()}, "embedded": embedded_config(),
           "pro_moe": pro_config()}
SLOW_FORMATS = ("ultra_pre_norm_no_q_lora",)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FORMATS else n
                                  for n in sorted(FORMATS)])
def test_logits_match_float64_reference_and_save_round_trips(name, tmp_path):
  hf = FORMATS[name]
  tensors = random_tensors(hf)
  config, params = load_pretrained(write_folder(tmp_path / "in", hf, tensors))
  logits = models.forward(config, params, jnp.asarray(TOKENS[None]))[0]
  np.testing.assert_allclose(logits, reference_logits(hf, tensors, TOKENS), rtol=1e-4, atol=1e-4)

  save_pretrained(config, params, tmp_path / "out", architecture=hf["architectures"][0])
  saved = _read_folder(tmp_path / "out")
  assert sorted(saved) == sorted(tensors)
  for k in tensors:
    np.testing.assert_array_equal(saved[k], tensors[k], err_msg=k)
  config2, params2 = load_pretrained(tmp_path / "out")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_ultra_moe_mtp_layer_matches_float64_reference_and_round_trips(tmp_path):
  hf = ultra_config(num_mtp_layers=1)
  tensors = random_tensors(hf)
  config, params = load_pretrained(write_folder(tmp_path / "in", hf, tensors))
  assert config.mtp_layers == 1

  @jax.jit
  def mtp_logits(params, tokens):
    def run(module, tokens):
      _, _, state = module.run(tokens[:, :-1])
      return module.mtp_logits(state.x, tokens[:, 1:])
    return Decoder(config).apply({"params": params}, tokens, method=run)

  got = mtp_logits(params, jnp.asarray(TOKENS[None]))[0]
  np.testing.assert_allclose(got, reference_mtp_logits(hf, tensors, TOKENS), rtol=1e-4, atol=1e-4)

  save_pretrained(config, params, tmp_path / "out")
  saved = _read_folder(tmp_path / "out")
  assert sorted(saved) == sorted(tensors)
  for k in tensors:
    np.testing.assert_array_equal(saved[k], tensors[k], err_msg=k)
  with open(tmp_path / "out" / "config.json") as f:
    written = json.load(f)
  assert written["num_mtp_layers"] == written["num_nextn_predict_layers"] == 1
  # The MTP layer's copies of the shared embedding and head are optional on load.
  bare = {k: v for k, v in tensors.items() if not k.endswith(("3.embed_tokens.weight", "3.shared_head.head.weight"))}
  config2, params2 = load_pretrained(write_folder(tmp_path / "bare", hf, bare))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _with_different_head_copy(tensors):
  changed = tensors["model.layers.3.shared_head.head.weight"].copy()
  changed[5, 7] += 1.0
  return {**tensors, "model.layers.3.shared_head.head.weight": changed}


@pytest.mark.parametrize("case, hf, tensors, message", [
    ("two MTP layers", ultra_config(num_mtp_layers=2), None, "num_mtp_layers=2"),
    ("fields disagree", ultra_config(num_mtp_layers=1, num_nextn_predict_layers=0), None,
     "num_mtp_layers=1 and num_nextn_predict_layers=0 disagree"),
    ("MTP tensors missing", ultra_config(num_mtp_layers=1), ultra_config(), r"missing \[.*model\.layers\.3\.eh_proj"),
    ("MTP tensors without the field", ultra_config(), ultra_config(num_mtp_layers=1),
     r"unexpected \[.*model\.layers\.3\.enorm"),
    ("own MTP head", ultra_config(num_mtp_layers=1), "different_head", r"layers\.3\.shared_head\.head\.weight differs"),
    ("Pro MoE MTP", pro_config(num_mtp_layers=1), pro_config(), "num_mtp_layers=1"),
])
def test_mtp_folders_we_cannot_hold_are_named(case, hf, tensors, message, tmp_path):
  if tensors == "different_head":
    tensors = _with_different_head_copy(random_tensors(hf))
  else:
    tensors = random_tensors(tensors or hf)
  with pytest.raises(CheckpointFormatError, match=message):
    load_pretrained(write_folder(tmp_path, hf, tensors))


@pytest.mark.slow
def test_loaded_ultra_moe_generates_greedily(tmp_path):
  hf = ultra_config()
  config, params = load_pretrained(write_folder(tmp_path, hf, random_tensors(hf)))
  prompt = [3, 17, 42, 5]
  out = decoding.generate(config, params, [prompt], decoding.GenerationConfig(max_new_tokens=4), jax.random.key(0))[0]
  tokens = np.array(prompt + list(out[:-1]), np.int32)
  np.testing.assert_array_equal(out, reference_logits(hf, random_tensors(hf), tokens)[len(prompt) - 1:].argmax(-1))


@pytest.mark.parametrize("field, value", [("num_nextn_predict_layers", 2), ("norm_topk_prob", False),
                                          ("moe_layer_freq", 2), ("hidden_act", "gelu")])
def test_unsupported_ultra_options_name_the_field(field, value, tmp_path):
  hf = ultra_config(**{field: value})
  with pytest.raises(CheckpointFormatError, match=field):
    load_pretrained(write_folder(tmp_path, hf, random_tensors(ultra_config())))


def test_unmapped_architecture_is_named(tmp_path):
  hf = embedded_config(architectures=["PanguProMoEV2ForCausalLM"])
  with pytest.raises(CheckpointFormatError, match="PanguProMoEV2ForCausalLM is not mapped: .*v_channels.*"
                                                 "param_sink_number"):
    load_pretrained(write_folder(tmp_path, hf, random_tensors(embedded_config())))


@pytest.mark.parametrize("field, value", [("mlp_only_layers", [1]), ("shared_expert_intermediate_size", 12)])
def test_unsupported_pro_moe_options_name_the_field(field, value, tmp_path):
  with pytest.raises(CheckpointFormatError, match=field):
    load_pretrained(write_folder(tmp_path, pro_config(**{field: value}), random_tensors(pro_config())))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  hf = ultra_config()
  tensors = random_tensors(hf)
  del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
  tensors["model.layers.0.self_attn.kv_b_proj.weight"] = tensors["model.layers.0.self_attn.kv_b_proj.weight"][:-1]
  with pytest.raises(CheckpointFormatError, match=r"experts\.3\.up_proj[\s\S]*kv_b_proj\.weight has shape"):
    load_pretrained(write_folder(tmp_path, hf, tensors))


@pytest.mark.parametrize("config, architecture, field", [
    (models.tiny(attention_bias=True), "PanguEmbeddedForCausalLM", "attention_output_bias"),  # q/k/v biases only
    (models.tiny(mtp_layers=1), None, "mtp_layers"),  # only Ultra MoE folders hold an MTP layer
])
def test_saving_a_config_the_format_cannot_hold_names_it(config, architecture, field, tmp_path):
  with pytest.raises(ValueError, match=field):
    params = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))  # the config alone is refused
    save_pretrained(config, params, tmp_path, architecture=architecture)
