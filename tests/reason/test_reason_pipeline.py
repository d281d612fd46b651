"""End to end (full tier): a student trained on fusion data writes a reasoning span in slow mode and none in fast
mode, and the toy pipeline runs all its phases, saves a student whose params restore, and reports every mode and
level."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu import models
from pangu.data.tokenizer import ByteTokenizer
from pangu.parallel import rules, single_device_mesh
from pangu.reason import chat, distill, dual, pipeline, tasks, teacher
from pangu.train.checkpoint import Checkpointer
from pangu.train.config import TrainConfig
from pangu.train.step import init_train_state, make_train_step

FMT = chat.COMPACT_FORMAT
TOKENIZER = ByteTokenizer()


@pytest.mark.slow
def test_mode_switch_strings_change_the_trained_models_output_format():
  config = tasks.TaskConfig(modulus=10, arith_ops="+-")
  items = [t for lv in (1, 2) for t in tasks.generate("arith", lv, 64, seed=0, config=config)]
  pairs = dual.fusion_examples(items, [teacher.slow(t) for t in items], None, FMT)
  model = models.tiny(vocab_size=TOKENIZER.vocab_size, d_model=64, n_heads=4, n_kv_heads=2, d_ff=256)
  train_config = TrainConfig(peak_lr=3e-3, warmup_steps=10, total_steps=400, weight_decay=0.0)
  mesh = single_device_mesh()
  state = init_train_state(model, train_config, jax.random.key(0), mesh)
  step = make_train_step(model, train_config, mesh)
  rng = np.random.default_rng(0)
  for _ in range(250):
    chosen = rng.integers(0, len(pairs), 32)
    state, _ = step(state, distill.sft_batch(TOKENIZER, [pairs[i][0] for i in chosen],
                                             [pairs[i][1] for i in chosen], 48))
  held_out = tasks.generate("arith", 2, 16, seed=99, config=config)
  parsed = {}
  for mode in ("slow", "fast"):
    prompts = [chat.render_prompt(t.prompt, mode=mode, fmt=FMT) for t in held_out]
    replies = distill.sample_replies(model, state.params, prompts, TOKENIZER, FMT, max_new_tokens=24,
                                     rng=jax.random.key(1), batch=16)
    parsed[mode] = [chat.parse_response(text, FMT) for text in replies.texts]
  assert np.mean([p.complete and p.mode == "slow" for p in parsed["slow"]]) >= 0.9
  assert np.mean([p.complete and p.mode == "fast" for p in parsed["fast"]]) >= 0.9
  assert np.mean([len(p.reasoning) for p in parsed["slow"]]) > 5 * np.mean([len(p.reasoning) for p in parsed["fast"]]) + 3


@pytest.mark.slow
def test_pipeline_runs_and_saves_a_restorable_student(tmp_path):
  config = pipeline.PipelineConfig(iterations=1, warmup_steps=25, iteration_steps=3, fusion_steps=3, pool=4,
                                   select=8, samples=2, eval_items=2, levels=(1, 2), width=32, layers=1,
                                   auto_label_rule="relative")
  payload, report = pipeline.run(config, checkpoint_dir=str(tmp_path / "student"), log=lambda line: None)
  assert set(payload) == {"iterations", "modes"} and len(payload["iterations"]) == 1
  assert set(payload["iterations"][0]) == {"acc", "acc_merged", "merged_minus_acc_se"}
  for mode in ("slow", "fast", "auto"):
    assert set(payload["modes"][mode]) == {"1", "2"}
    for result in payload["modes"][mode].values():
      assert 0 <= result["accuracy"] <= 1 and result["mean_tokens"] >= 1
      assert result["per_family"] == {"arith": {"accuracy": result["accuracy"], "mean_tokens": result["mean_tokens"]}}
  # What the RL stage does to start from the student: the config from the metadata, then only the params.
  checkpointer = Checkpointer(str(tmp_path / "student"))
  stored = models.TransformerConfig.from_dict(checkpointer.metadata()["model"])
  assert (stored.d_model, stored.n_layers, stored.vocab_size) == (32, 1, TOKENIZER.vocab_size)
  target = rules.param_shardings(models.abstract_params(stored), single_device_mesh())
  abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
                          nn.unbox(models.abstract_params(stored)))
  params = checkpointer.restore_params(abstract)
  checkpointer.close()
  logits = models.forward(stored, params, np.asarray([TOKENIZER.encode("Q:1+2\n|")]))
  assert logits.shape == (1, 7, TOKENIZER.vocab_size) and np.isfinite(np.asarray(logits)).all()
  assert "student saved" in report


def test_token_cap_fits_the_teachers_most_verbose_correct_reply():
  config = pipeline.PipelineConfig(levels=(1, 3), families=("arith", "list"))
  seq_len, max_new = pipeline.sequence_lengths(config, TOKENIZER)
  rng = np.random.default_rng(0)
  longest = canonical = 0
  for family in config.families:
    for task in tasks.generate(family, 3, 32, seed=5, config=pipeline.TASK_CONFIG):
      best = distill.shortest_correct(task, drawn := teacher.candidates(task, rng), TOKENIZER, FMT)
      for solution in ([drawn[best]] if best is not None else []) + [teacher.slow(task)]:
        reply = chat.render_response(solution.reasoning, solution.answer, mode="auto", chosen="slow", fmt=FMT)
        prompt = chat.render_prompt(task.prompt, mode="auto", fmt=FMT)
        assert len(TOKENIZER.encode(reply)) < max_new
        assert len(TOKENIZER.encode(prompt + reply)) <= seq_len + 1
        longest = max(longest, len(reply))
      canonical = max(canonical, len(chat.render_response(teacher.slow(task).reasoning, task.answer, mode="auto",
                                                          chosen="slow", fmt=FMT)))
  assert longest > canonical  # some picked targets are verbose: a cap at the canonical length would cut them


def test_the_prompt_splits_are_disjoint_and_cover_every_family_and_level():
  config = pipeline.PipelineConfig(levels=(1, 3), families=("arith", "code"), pool=64, eval_items=8)
  splits = pipeline.data_splits(config, seed=3)
  prompts = [{t.prompt for t in split} for split in splits]
  assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
  for split, per_group in zip(splits, (config.pool, config.pool, config.eval_items)):
    counts = {(f, lv): sum(t.family == f and t.level == lv for t in split) for f in config.families
              for lv in config.levels}
    assert all(0 < n <= per_group for n in counts.values()), counts
  assert splits.pool == pipeline.data_splits(config, seed=3).pool


@pytest.mark.parametrize("field, value", [("levels", ()), ("families", ("open",)), ("merge", "average"),
                                          ("reply_weighting", "sequence"), ("auto_label_rule", "oracle"),
                                          ("auto_label_items", "eval")])
def test_a_bad_pipeline_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"PipelineConfig.{field}"):
    pipeline.PipelineConfig(**{field: value})
