"""MoLE: the lookup form equals the training form, wherever the table lives and however it is encoded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pangu import models
from pangu.infer.decoding import GenerationConfig, generate
from pangu.models import mole
from pangu.nn import lookup_table
from pangu.nn.lookup_table import LookupTableError, TableShape
from pangu.nn.mole import MoLEConfig

from reference_decoder import decoder_logits, gelu, rms_norm

# Distinct L, N, D so that a wrong flatten order of the table cannot go unnoticed.
V, L, N, D = 29, 3, 5, 16


def _config(**changes):
  base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, d_ff=48, mlp_activation="gelu",
              mole=MoLEConfig(num_experts=N, expert_dim=24), init="normal")
  return models.TransformerConfig(**{**base, **changes})


@functools.cache
def _trained(scan_layers: bool = True):
  """A model trained for a few steps on ids < V // 2 only, so ids >= V // 2 were never seen in training."""
  cfg = _config(scan_layers=scan_layers)
  params = models.init_params(cfg, jax.random.key(0))
  opt = optax.adam(3e-2)
  state = opt.init(params)
  tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, V // 2)

  @jax.jit
  def step(params, state):
    loss = lambda p: models.cross_entropy_loss(models.forward(cfg, p, tokens[:, :-1]), tokens[:, 1:])[0]
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    params, state = step(params, state)
  return cfg, params


def _unseen_tokens():
  return jax.random.randint(jax.random.key(2), (2, 11), V // 2, V)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_table_holds_each_expert_on_each_vocab_row(scan_layers):
  cfg, params = _trained(scan_layers)
  table = mole.expert_table(cfg, params, chunk_size=8)  # chunks that do not divide V
  assert table.shape == (V, L, N, D)
  emb = np.asarray(params["embedding"], np.float64)
  for layer in (0, L - 1):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), models.layer_params(cfg, params, layer)["mole"])
    e = rms_norm(emb, p["expert_norm"]["scale"], cfg.norm_eps)
    for j in (0, N - 1):
      want = gelu(e @ p["up"][j]) @ p["down"][j]
      np.testing.assert_allclose(table[:, layer, j], want, atol=1e-5, rtol=1e-5)


def test_experts_run_per_vocabulary_row_give_the_per_token_loss_and_gradients():
  # 4 x 12 tokens > V rows: the batch runs each expert once per vocabulary row; one row of it at a time
  # (11 tokens < V) runs them once per token. Equal-length rows: the batch loss is the mean of the row losses.
  cfg, params = _trained()
  tokens = jax.random.randint(jax.random.key(3), (4, 12), 0, V)
  loss = lambda p, t: models.cross_entropy_loss(models.forward(cfg, p, t[:, :-1]), t[:, 1:])[0]
  loss_and_grads = jax.jit(jax.value_and_grad(loss))
  got_loss, got_grads = loss_and_grads(params, tokens)
  rows = [loss_and_grads(params, tokens[b:b + 1]) for b in range(4)]
  np.testing.assert_allclose(got_loss, np.mean([l for l, _ in rows]), rtol=1e-6)
  want_grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *[g for _, g in rows])
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4), got_grads, want_grads)
  logits = jax.jit(functools.partial(models.forward, cfg))(params, tokens)
  unrolled = jax.tree.map(lambda x: np.asarray(x, np.float64), models.unstack_layers(params, L))
  for b in range(4):
    np.testing.assert_allclose(logits[b], decoder_logits(cfg, unrolled, tokens[b]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lookup_form_equals_training_form_on_unseen_ids(scan_layers):
  cfg, params = _trained(scan_layers)
  tokens = _unseen_tokens()
  lut_cfg, lut_params = mole.reparameterize(cfg, params)
  want = models.forward(cfg, params, tokens)
  np.testing.assert_allclose(models.forward(lut_cfg, lut_params, tokens), want, atol=1e-5, rtol=0)
  for layer in range(L):
    assert set(models.layer_params(lut_cfg, lut_params, layer)["mole"]) == {"router"}


@pytest.mark.parametrize("storage", ["host", "numpy", "disk"])
def test_every_storage_gives_the_same_logits_and_moves_one_row_per_token(storage, tmp_path):
  cfg, params = _trained()
  lut_cfg, lut_params = mole.reparameterize(cfg, params)
  placed_cfg, placed = mole.place_table(lut_cfg, lut_params, storage, path=str(tmp_path / "table"))
  assert placed_cfg.mole.table_storage == storage
  if storage == "host":
    assert {x.sharding.memory_kind for x in placed[mole.TABLE_KEY].values()} == {"pinned_host"}
  else:
    assert mole.TABLE_KEY not in placed
  tokens = _unseen_tokens()
  lookup_table.TRANSFERS.reset()
  got = models.forward(placed_cfg, placed, tokens)
  np.testing.assert_allclose(got, models.forward(cfg, params, tokens), atol=1e-5, rtol=0)
  if storage != "host":
    # float32: L * N * D values of 4 bytes for each of the B * S tokens.
    assert lookup_table.TRANSFERS.bytes[str(tmp_path / "table")] == tokens.size * L * N * D * 4


def test_quantised_tables_move_encoded_bytes(tmp_path):
  cfg, params = _trained()
  tokens = _unseen_tokens()
  for table_format, per_token in (("bfloat16", L * N * D * 2), ("int8", L * N * (D + 4)),
                                  ("nf4", L * N * (D // 2 + 4))):
    lut_cfg, lut_params = mole.reparameterize(cfg, params, table_format=table_format)
    assert mole.row_bytes_per_token(lut_cfg) == per_token
    path = str(tmp_path / table_format)
    disk_cfg, disk_params = mole.place_table(lut_cfg, lut_params, "disk", path=path)
    lookup_table.TRANSFERS.reset()
    models.forward(disk_cfg, disk_params, tokens)
    assert lookup_table.TRANSFERS.bytes[path] == tokens.size * per_token


@pytest.mark.parametrize("table_format", ["bfloat16", "float16", "int8", "nf4"])
def test_encoding_error_stays_within_the_documented_bound(table_format):
  cfg, params = _trained()
  table = mole.expert_table(cfg, params)
  shape = TableShape(V, L, N, D)
  decoded = lookup_table.decode_rows(
      {k: jnp.asarray(v) for k, v in lookup_table.encode_table(table, table_format).items()}, shape, table_format,
      jnp.float32)
  err = np.abs(np.asarray(decoded) - table)
  bound = lookup_table.error_bound(table, table_format)
  assert np.all(err <= bound), float((err - bound).max())
  assert err.max() > 0  # the encodings are lossy on these values; the bound is not vacuous
  if table_format == "nf4":  # NF4 is coarse: it must still beat the trivial all-zero table by far.
    assert err.mean() < 0.2 * np.abs(table).mean()


def test_lookup_model_generates_the_same_tokens_with_a_kv_cache(tmp_path):
  cfg, params = _trained()
  gen = GenerationConfig(max_new_tokens=5)
  prompts = [[3, 20, 7], [25, 1]]
  want = generate(cfg, params, prompts, gen, jax.random.key(0))
  lut_cfg, lut_params = mole.place_table(*mole.reparameterize(cfg, params), "disk", path=str(tmp_path / "t"))
  got = generate(lut_cfg, lut_params, prompts, gen, jax.random.key(0))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("field, changes", [
    ("vocab_size", dict(vocab_size=V + 1)),
    ("n_layers", dict(n_layers=L + 1)),
    ("num_experts", dict(mole=MoLEConfig(num_experts=N + 1, expert_dim=24))),
    ("d_model", dict(d_model=2 * D)),
])
def test_a_table_from_another_model_is_rejected_naming_the_field(field, changes, tmp_path):
  cfg, params = _trained()
  path = str(tmp_path / "t")
  mole.place_table(*mole.reparameterize(cfg, params), "disk", path=path)
  other = _config(**changes)
  other = other.replace(mole=dataclasses.replace(other.mole, lookup=True, table_storage="disk", table_path=path))
  with pytest.raises(LookupTableError, match=f"does not match the model: {field}: file"):
    models.init_params(other, jax.random.key(0))


def test_a_table_in_another_format_or_corrupt_is_rejected(tmp_path):
  cfg, params = _trained()
  path = str(tmp_path / "t")
  disk_cfg, _ = mole.place_table(*mole.reparameterize(cfg, params, table_format="int8"), "disk", path=path)
  shape = TableShape(V, L, N, D)
  with pytest.raises(LookupTableError, match="table_format: file int8, model float16"):
    lookup_table.load_table(path, expected_shape=shape, expected_format="float16")
  with open(tmp_path / "t" / "values.npy", "r+b") as f:
    f.truncate(100)
  with pytest.raises(LookupTableError, match="values.npy"):
    lookup_table.load_table(path)
  (tmp_path / "t" / "table.json").write_text("{not json")
  with pytest.raises(LookupTableError, match="not a readable lookup table"):
    lookup_table.load_table(path)


def test_rewriting_a_table_replaces_it_whole(tmp_path):
  shape = TableShape(3, 1, 2, 4)
  path = str(tmp_path / "t")
  first = lookup_table.encode_table(np.ones((3, 1, 2, 4)), "float32")
  second = lookup_table.encode_table(2 * np.ones((3, 1, 2, 4)), "int8")
  lookup_table.save_table(path, shape, "float32", first)
  lookup_table.save_table(path, shape, "int8", second)
  _, table_format, stored = lookup_table.load_table(path)
  assert table_format == "int8" and set(stored) == {"values", "scales"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary directory left behind


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=0, expert_dim=4), "num_experts"),
    (dict(num_experts=2, expert_dim=4, lookup=True, table_format="int4"), "table_format"),
    (dict(num_experts=2, expert_dim=4, lookup=True, table_storage="disk"), "table_path"),
    (dict(num_experts=2, expert_dim=4, table_format="int8"), "training form"),
])
def test_bad_mole_config_names_the_problem(kwargs, field):
  with pytest.raises(ValueError, match=field):
    MoLEConfig(**kwargs)


def test_mole_and_moe_are_exclusive():
  from pangu.nn.moe import MoEConfig
  with pytest.raises(ValueError, match="exclusive"):
    _config(moe=MoEConfig(num_experts=4, top_k=2, expert_dim=8))


def test_a_quantised_table_gives_the_same_logits_on_host_and_device():
  cfg, params = _trained()
  lut_cfg, lut_params = mole.reparameterize(cfg, params, table_format="nf4")
  tokens = _unseen_tokens()
  np.testing.assert_allclose(models.forward(*mole.place_table(lut_cfg, lut_params, "host"), tokens),
                             models.forward(lut_cfg, lut_params, tokens), atol=1e-6, rtol=0)


# Hot-row cache: token counts in which the ids >= V // 2, never seen in training, are the rare ones.
_COUNTS = np.concatenate([np.arange(V // 2, 0, -1) * 10.0, np.arange(V - V // 2, dtype=np.float64)])


@pytest.mark.parametrize("storage, table_format", [("host", "nf4"), ("disk", "float32")])
def test_a_hot_row_cache_gives_the_logits_of_the_table_on_device(storage, table_format, tmp_path):
  cfg, params = _trained()
  lut_cfg, lut_params = mole.reparameterize(cfg, params, table_format=table_format)
  placed = mole.place_table(lut_cfg, lut_params, storage, path=str(tmp_path / "t"))
  # Batches of one shape (one compile each): hits only, misses only (ids never seen in training), mixed.
  batches = [jnp.tile(jnp.arange(3, dtype=jnp.int32), (2, 4))[:, :11], _unseen_tokens(),
             jax.random.randint(jax.random.key(3), (2, 11), 0, V)]
  for n_rows in (6, V):
    hot_cfg, hot_params = mole.cache_hot_rows(*placed, _COUNTS, n_rows)
    assert hot_cfg.mole.hot_rows == n_rows and mole.HOT_KEY in hot_params
    for tokens in batches:
      np.testing.assert_array_equal(models.forward(hot_cfg, hot_params, tokens),
                                    models.forward(lut_cfg, lut_params, tokens), err_msg=f"{n_rows} rows")


def test_a_cached_disk_table_reads_only_the_misses(tmp_path):
  cfg, params = _trained()
  path = str(tmp_path / "t")
  hot_cfg, hot_params = mole.cache_hot_rows(
      *mole.place_table(*mole.reparameterize(cfg, params), "disk", path=path), _COUNTS, 6)
  hot = np.argsort(-_COUNTS)[:6]
  for tokens in (np.array([[0, 1, 2, 3]]), np.array([[0, 20, 1, 28]]), np.array([[17, 20, 21, 28]])):
    lookup_table.TRANSFERS.reset()
    models.forward(hot_cfg, hot_params, jnp.asarray(tokens, jnp.int32))
    misses = int(np.sum(~np.isin(tokens, hot)))
    moved = 0 if misses == 0 else min(tokens.size, 1 << (misses - 1).bit_length())  # the copy's bucket
    assert lookup_table.TRANSFERS.bytes.get(path, 0) == moved * L * N * D * 4, tokens


def test_a_hot_row_cache_generates_the_same_tokens(tmp_path):
  cfg, params = _trained()
  gen = GenerationConfig(max_new_tokens=5)
  prompts = [[3, 20, 7], [25, 1]]
  want = generate(cfg, params, prompts, gen, jax.random.key(0))
  lut = mole.place_table(*mole.reparameterize(cfg, params), "host")
  got = generate(*mole.cache_hot_rows(*lut, _COUNTS, 6), prompts, gen, jax.random.key(0))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_bad_hot_row_settings_name_the_field():
  cfg, params = _trained()
  lut_cfg, lut_params = mole.reparameterize(cfg, params)
  with pytest.raises(ValueError, match="table_storage='device'"):
    mole.cache_hot_rows(lut_cfg, lut_params, _COUNTS, 4)
  host = mole.place_table(lut_cfg, lut_params, "host")
  with pytest.raises(ValueError, match="n_rows must be an int in \\[0, vocab_size=29\\], got 30"):
    mole.cache_hot_rows(*host, _COUNTS, V + 1)
  with pytest.raises(ValueError, match="n_rows must be an int in \\[0, vocab_size=29\\], got -2"):
    mole.cache_hot_rows(*host, _COUNTS, -2)
  with pytest.raises(ValueError, match="MoLEConfig.hot_rows must be an int >= 0, got -1"):
    MoLEConfig(num_experts=2, expert_dim=4, lookup=True, table_storage="host", hot_rows=-1)
  with pytest.raises(ValueError, match="hot_rows must be <= vocab_size=29, got 30"):
    lut_cfg.replace(mole=dataclasses.replace(host[0].mole, hot_rows=V + 1))
  # Moving the table back onto the device drops the cache with it.
  back_cfg, back_params = mole.place_table(*mole.cache_hot_rows(*host, _COUNTS, 4), "device")
  assert back_cfg.mole.hot_rows == 0 and mole.HOT_KEY not in back_params
