"""Continue prompts with a Hugging Face model folder or a pangu training checkpoint, and report tokens/s.

  python -m pangu.infer.generate --model=/models/Qwen3-0.6B --prompt="The capital of France is" \
      --max_new_tokens=32 --temperature=0.7 --top_p=0.9

--model is a folder with config.json + *.safetensors (Llama, Qwen2, Qwen3; see pangu.interop.hf) or a
checkpoint folder written by pangu.train (its newest step). The tokenizer is the folder's tokenizer.json when
there is one, else the byte tokenizer; --tokenizer overrides. Repeat --prompt for a batch (left-padded).
Generation stops at the tokenizer's EOS and the config's eos_token_id(s). Prompts are left-padded to a
power-of-two width (pangu.infer.prompt_bucket), so most new prompt lengths reuse the compiled programs.
"""

import json
import os
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "HF model folder or pangu training checkpoint folder.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", ["Once upon a time"], "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Upper bound on generated tokens per prompt.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte' or a tokenizer.json; default: the model folder's "
                                 "tokenizer.json if present, else 'byte'.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Parameter / compute dtype "
                           "(default: the checkpoint's).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile with one untimed run first, so tokens/s excludes compilation.")


def _load_training_checkpoint(path: str):
  """(config, params) of the newest step of a pangu.train checkpoint folder; only the params are read."""
  import flax.linen as nn
  import jax

  from pangu.models import abstract_params
  from pangu.models.config import TransformerConfig
  from pangu.parallel import rules, single_device_mesh
  from pangu.train.checkpoint import Checkpointer

  checkpointer = Checkpointer(path)
  step = checkpointer.latest_step()
  if step is None or not os.path.isfile(os.path.join(path, str(step), "meta", "metadata")):
    raise FileNotFoundError(f"{path} is neither a Hugging Face folder (no config.json) nor a pangu checkpoint")
  config = TransformerConfig.from_dict(checkpointer.metadata(step)["model"])
  target = rules.param_shardings(abstract_params(config), single_device_mesh())
  abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
                          nn.unbox(abstract_params(config)))
  params = checkpointer.restore_params(abstract, step=step)
  checkpointer.close()
  return config, params


def _stop_ids(config, tokenizer) -> tuple[int, ...]:
  return tuple(sorted({tokenizer.eos_id, *config.eos_token_ids}))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from pangu import data, infer
  from pangu.interop import hf

  path = _MODEL.value
  hf_config = {}
  if os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
    with open(os.path.join(path, hf.CONFIG_FILE)) as f:
      hf_config = json.load(f)
    config, params = hf.load_pretrained(path, dtype=_DTYPE.value, scan_layers=False)
  else:
    config, params = _load_training_checkpoint(path)
    if _DTYPE.value:
      config = config.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
      params = jax.tree.map(lambda x: x.astype(_DTYPE.value), params)
  config, params = infer.decode_layout(config, params)

  tokenizer_spec = _TOKENIZER.value or (path if os.path.isfile(os.path.join(path, "tokenizer.json")) else "byte")
  tokenizer = data.load_tokenizer(tokenizer_spec)
  if tokenizer.vocab_size > config.vocab_size:
    raise app.UsageError(f"tokenizer {tokenizer_spec!r} has {tokenizer.vocab_size} ids but the model only "
                         f"{config.vocab_size}; pass --tokenizer")
  # Llama checkpoints expect BOS first; pangu's packed training data puts the previous document's EOS there.
  if hf_config.get("model_type") == "llama" and config.bos_token_id is not None:
    prefix = [config.bos_token_id]
  else:
    prefix = [] if hf_config else [tokenizer.eos_id]
  prompts = [prefix + tokenizer.encode(text).tolist() for text in _PROMPT.value]
  gen = infer.GenerationConfig(
      max_new_tokens=_MAX_NEW.value, sampling=infer.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value),
      stop_tokens=_stop_ids(config, tokenizer), pad_id=tokenizer.pad_id)
  tokens, start = infer.left_pad(prompts, gen.pad_id, infer.prompt_bucket(max(len(p) for p in prompts)))

  def run():
    t0 = time.perf_counter()
    state = infer.prefill(config, gen, params, tokens, start, jax.random.key(_SEED.value))
    state.last.block_until_ready()
    t1 = time.perf_counter()
    state = infer.decode(config, gen, params, state)
    out, lengths = jax.device_get((state.tokens, state.lengths))
    return out, lengths, t1 - t0, time.perf_counter() - t1

  if _WARMUP.value:
    run()
  out, lengths, prefill_s, decode_s = run()
  for text, row, n in zip(_PROMPT.value, out, lengths):
    print(f"{text}{tokenizer.decode(row[:n])}")
    print("-" * 40)
  note = "" if _WARMUP.value else " (including compilation)"
  prompt_tokens = sum(len(p) for p in prompts)  # the bucket's left padding is not counted
  print(f"prefill: {prompt_tokens} tokens in {prefill_s:.3f} s = {prompt_tokens / prefill_s:.1f} tokens/s{note}")
  decoded = int(lengths.sum()) - len(prompts)
  print(f"decode: {decoded} tokens in {decode_s:.3f} s = {decoded / max(decode_s, 1e-9):.1f} tokens/s{note}")


if __name__ == "__main__":
  app.run(main)
