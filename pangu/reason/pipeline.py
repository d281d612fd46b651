"""The Pangu Embedded training pipeline on toy tasks: warm-up SFT, T distillation iterations with merging, dual-
system fusion, and the per-mode evaluation (the experiment `experiments/embedded_dual.py` and the notebook run it).

Each SFT phase uses the shared train step (`pangu.train.step.make_train_step`) with `lm_loss` over batches masked
to the reply (`distill.sft_batch`); the optimiser is reset whenever training continues from merged weights.
"""

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pangu import models
from pangu.data.tokenizer import ByteTokenizer
from pangu.parallel.mesh import single_device_mesh
from pangu.reason import chat, distill, dual, merging, tasks, teacher
from pangu.train.checkpoint import save_replacing
from pangu.train.config import TrainConfig
from pangu.train.optim import make_optimizer
from pangu.train.step import init_train_state, make_train_step

MODES = ("slow", "fast", "auto")
# Where auto mode's labels are measured: fresh prompts from the same generators, disjoint from the pool and the
# evaluation ("fresh"), or the pool itself ("pool"), whose fast answers the student has been trained on.
AUTO_LABEL_ITEMS = ("fresh", "pool")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Sizes of the toy run (see experiments/embedded_dual.py for the two presets)."""

  iterations: int = 3
  warmup_steps: int = 500
  iteration_steps: int = 80
  fusion_steps: int = 300
  pool: int = 48
  select: int = 64
  samples: int = 4
  eval_items: int = 32
  levels: tuple[int, ...] = (1, 2, 3, 4)
  families: tuple[str, ...] = ("arith",)
  width: int = 96
  layers: int = 2
  merge: str = "accumulate"
  batch: int = 32
  lr: float = 3e-3
  fast_threshold: float = 0.75
  auto_label_rule: str = "absolute"
  auto_label_items: str = "fresh"
  reply_weighting: str = "token"

  def __post_init__(self):
    object.__setattr__(self, "levels", tuple(self.levels))
    object.__setattr__(self, "families", tuple(self.families))
    if set(self.levels) - set(tasks.LEVELS) or not self.levels:
      raise ValueError(f"PipelineConfig.levels must be a non-empty subset of {tasks.LEVELS}, got {self.levels}")
    if set(self.families) - set(tasks.GENERATED_FAMILIES) or not self.families:
      raise ValueError(f"PipelineConfig.families must be a non-empty subset of {tasks.GENERATED_FAMILIES}, got "
                       f"{self.families}")
    if self.reply_weighting not in distill.REPLY_WEIGHTINGS:
      raise ValueError(f"PipelineConfig.reply_weighting must be one of {distill.REPLY_WEIGHTINGS}, got "
                       f"{self.reply_weighting!r}")
    if self.auto_label_rule not in dual.AUTO_LABEL_RULES:
      raise ValueError(f"PipelineConfig.auto_label_rule must be one of {dual.AUTO_LABEL_RULES}, got "
                       f"{self.auto_label_rule!r}")
    if self.auto_label_items not in AUTO_LABEL_ITEMS:
      raise ValueError(f"PipelineConfig.auto_label_items must be one of {AUTO_LABEL_ITEMS}, got "
                       f"{self.auto_label_items!r}")
    if self.merge not in merging.METHODS:
      raise ValueError(f"PipelineConfig.merge must be one of {merging.METHODS}, got {self.merge!r}")


TASK_CONFIG = tasks.TaskConfig(modulus=10, arith_ops="+-")
FORMAT = chat.COMPACT_FORMAT
# SFT batches are cut to their longest pair rounded up to this (`distill.sft_batch(length_multiple=)`): replies
# run from 4 tokens (fast arithmetic) to ~80 (slow code), and the train step compiles once per length.
TRAIN_LENGTH_MULTIPLE = 16


def _copy(params):
  return jax.tree.map(jnp.copy, params)


class Splits(NamedTuple):
  """The pipeline's prompts; no prompt is in two of them."""

  pool: list[tasks.Task]  # warm-up, distillation and fusion SFT
  label_items: list[tasks.Task]  # where auto mode's labels are measured (auto_label_items="fresh")
  evaluation: list[tasks.Task]  # held out: every reported accuracy


def data_splits(config: PipelineConfig, seed: int) -> Splits:
  """Up to `config.pool` draws per family and level for the pool and for the label split (repeats allowed, as
  the generators draw them; level 1 has only ~200 distinct prompts, so its label split is shorter) and
  `config.eval_items` for evaluation, each split without the prompts of the ones before it."""
  evaluation = [t for f in config.families for lv in config.levels
                for t in tasks.generate(f, lv, config.eval_items, seed + 10_000, TASK_CONFIG)]

  def draw(offset: int, excluded: set[str]) -> list[tasks.Task]:
    by_level = {}
    for f in config.families:
      for lv in config.levels:
        fresh = [t for t in tasks.generate(f, lv, 4 * config.pool, seed + offset, TASK_CONFIG)
                 if t.prompt not in excluded]
        by_level[(f, lv)] = fresh[:config.pool]
    return [t for group in by_level.values() for t in group]

  pool = draw(0, {t.prompt for t in evaluation})
  return Splits(pool, draw(20_000, {t.prompt for t in evaluation + pool}), evaluation)


def sequence_lengths(config: PipelineConfig, tokenizer) -> tuple[int, int]:
  """(seq_len, max_new_tokens): room for the teacher's most verbose correct slow reply of the hardest level in auto
  mode plus a margin, in every mode (one token cap for all modes). The verbose candidate wins the shortest-correct
  pick whenever the shorter ones have a wrong step, so the student learns to write it too; a cap at the canonical
  length cut those replies off (19% truncated at level 3). A training pair that does not fit is an error in
  `sft_batch`."""
  longest_prompt = longest_reply = 0
  for f in config.families:
    for t in tasks.generate(f, max(config.levels), 64, 1, TASK_CONFIG):
      solution = teacher.verbose(t)
      prompt = chat.render_prompt(t.prompt, mode="auto", fmt=FORMAT)
      reply = chat.render_response(solution.reasoning, solution.answer, mode="auto", chosen="slow", fmt=FORMAT)
      longest_prompt = max(longest_prompt, len(tokenizer.encode(prompt)))
      longest_reply = max(longest_reply, len(tokenizer.encode(reply)))
  max_new = longest_reply + 8
  return 16 * -(-(longest_prompt + max_new + 16) // 16), max_new


def run(config: PipelineConfig, *, seed: int = 0, checkpoint_dir: str | None = None, log=print):
  """Runs the pipeline; returns (payload {"iterations", "modes"}, a text report of the side numbers)."""
  begin = time.perf_counter()
  tokenizer = ByteTokenizer()
  pool, label_items, evaluation = data_splits(config, seed)
  seq_len, max_new = sequence_lengths(config, tokenizer)
  model_config = models.tiny(vocab_size=tokenizer.vocab_size, d_model=config.width, n_layers=config.layers,
                             n_heads=4, n_kv_heads=2, d_ff=4 * config.width)
  # One schedule for every phase: the optimiser reset restarts it (20 warm-up steps, then cosine decay).
  longest_phase = max(config.warmup_steps, config.fusion_steps, config.iteration_steps)
  train_config = TrainConfig(peak_lr=config.lr, end_lr=config.lr / 10, warmup_steps=min(20, longest_phase // 4),
                             total_steps=longest_phase + 1, weight_decay=0.0)
  mesh = single_device_mesh()
  step = make_train_step(model_config, train_config, mesh)
  tx = make_optimizer(train_config)
  state = init_train_state(model_config, train_config, jax.random.key(seed), mesh)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 1)
  if config.auto_label_items == "pool":
    label_items = pool
  report = [f"pool {len(pool)} prompts, auto labels on {len(label_items)}, eval {len(evaluation)}, seq_len {seq_len}, "
            f"max_new_tokens {max_new}"]

  def train(state, groups, steps):
    """SFT steps whose batches draw equally from each group of (prompt, reply) pairs."""
    losses = []
    for _ in range(steps):
      drawn = [group[i] for j, group in enumerate(groups)
               for i in rng.integers(0, len(group), config.batch // len(groups) + (j < config.batch % len(groups)))]
      batch = distill.sft_batch(tokenizer, [p for p, _ in drawn], [r for _, r in drawn], seq_len,
                                weighting=config.reply_weighting, length_multiple=TRAIN_LENGTH_MULTIPLE)
      state, metrics = step(state, batch)
      losses.append(metrics["loss"])
    return state, float(np.mean(jax.device_get(losses[-10:])))

  def accuracy(params, mode, items):
    nonlocal key
    key, sub = jax.random.split(key)
    prompts = [chat.render_prompt(t.prompt, mode=mode, fmt=FORMAT) for t in items]
    replies, repaired = dual.self_repair(model_config, params, prompts, tokenizer, FORMAT, max_new_tokens=max_new,
                                         rng=sub)
    passed = distill.pass_matrix(items, replies, 1, FORMAT, mode)[:, 0]
    chosen = [chat.parse_response(r, FORMAT).chosen for r in replies.texts]
    return passed, replies.tokens, repaired, chosen

  # 1. Warm-up SFT: G_0.
  kept, solutions, dropped = distill.distillation_targets(pool, rng, tokenizer, FORMAT)
  state, loss = train(state, [dual.fusion_examples(kept, solutions, None, FORMAT)], config.warmup_steps)
  report.append(f"warm-up: {len(kept)} targets ({dropped} prompts without a correct candidate), loss {loss:.3f}, "
                f"{time.perf_counter() - begin:.0f} s")
  log(report[-1])
  # The train step donates its state: keep copies of every model the loop refers to later.
  base = merged = _copy(state.params)
  history, iterations = [], []
  merge_config = merging.MergeConfig(method=config.merge)
  distill_config = distill.DistillConfig(samples=config.samples, select=config.select)
  # 2. Iterative distillation with merging.
  for t in range(1, config.iterations + 1):
    key, sub = jax.random.split(key)
    c = distill.score(model_config, merged, pool, tokenizer, FORMAT, samples=config.samples, mode="slow",
                      max_new_tokens=max_new, rng=sub)
    chosen = distill.select(c, distill_config, rng)
    kept, solutions, dropped = distill.distillation_targets([pool[i] for i in chosen], rng, tokenizer, FORMAT)
    pairs = [(chat.render_prompt(k.prompt, mode="slow", fmt=FORMAT),
              chat.render_response(s.reasoning, s.answer, mode="slow", fmt=FORMAT)) for k, s in zip(kept, solutions)]
    state = distill.reset_optimizer(state, tx, merged)
    state, loss = train(state, [pairs], config.iteration_steps)
    new = _copy(state.params)
    key, sub = jax.random.split(key)
    new_merged = merging.merge_iteration(merge_config, merged, new, base=base, history=history, rng=sub)
    stats = merging.delta_stats(new_merged, merged)
    history.append(new)
    merged = new_merged
    passed_new, passed_merged = accuracy(new, "slow", evaluation)[0], accuracy(merged, "slow", evaluation)[0]
    acc, acc_merged = float(passed_new.mean()), float(passed_merged.mean())
    # Paired over the same items: merged and unmerged differ by a few items, within noise at this eval size.
    difference = passed_merged.astype(np.float64) - passed_new
    iterations.append({"acc": acc, "acc_merged": acc_merged,
                       "merged_minus_acc_se": float(difference.std(ddof=1) / np.sqrt(difference.size))})
    report.append(f"iteration {t}: mean C {c.mean():.2f}, selected {len(chosen)} (mean C {c[chosen].mean():.2f}), "
                  f"{dropped} dropped, loss {loss:.3f}, merge delta norm {stats['delta_norm']:.3f}, acc {acc:.3f}, "
                  f"merged {acc_merged:.3f}, {time.perf_counter() - begin:.0f} s")
    log(report[-1])
  # 3. Dual system (spec 3g). Phase 1, from the merged model: slow and fast replies (the iterations trained slow
  # mode only). Phase 2: auto labels from the phase-1 model's fast-mode pass rates (the model that will choose) on
  # the label items, then equal thirds of slow, fast and auto replies (auto on the label items). The student has
  # learnt the pool's fast answers by heart, so its pass rates there overstate fast mode on new prompts: the same
  # three-layer phase-1 model labelled 43 % / 62 % of level-1 arithmetic fast on the pool, 20 % / 22 % on fresh
  # prompts (two fusion seeds); with pool labels and 600 fusion steps auto chose fast on 95 % of level 1, and its
  # level-1 arithmetic scored 0.38 against slow mode's 0.81.
  kept, solutions, _ = distill.distillation_targets(pool, rng, tokenizer, FORMAT)
  both = dual.fusion_examples(kept, solutions, None, FORMAT)
  slow_pairs, fast_pairs = both[0::2], both[1::2]
  state = distill.reset_optimizer(state, tx, merged)
  state, _ = train(state, [slow_pairs, fast_pairs], config.fusion_steps // 2)
  key, sub = jax.random.split(key)
  fast_c = distill.score(model_config, state.params, label_items, tokenizer, FORMAT, samples=config.samples,
                         mode="fast", max_new_tokens=max_new, rng=sub)
  slow_pass = None
  if config.auto_label_rule == "relative":
    key, sub = jax.random.split(key)
    slow_pass = 1 - distill.score(model_config, state.params, label_items, tokenizer, FORMAT,
                                  samples=config.samples, mode="slow", max_new_tokens=max_new, rng=sub)
  labels = dual.auto_labels(1 - fast_c, config.fast_threshold, slow_pass)
  labelled, label_solutions = ((kept, solutions) if config.auto_label_items == "pool"
                                else distill.distillation_targets(label_items, rng, tokenizer, FORMAT)[:2])
  label_of = {}  # a prompt drawn twice keeps its first label
  for task, label in zip(label_items, labels):
    label_of.setdefault(task.prompt, label)
  auto_pairs = dual.fusion_examples(labelled, label_solutions, [label_of[t.prompt] for t in labelled],
                                    FORMAT)[2::3]
  state, loss = train(state, [slow_pairs, fast_pairs, auto_pairs], config.fusion_steps - config.fusion_steps // 2)
  share = {lv: float(np.mean([lab == "fast" for t, lab in zip(label_items, labels) if t.level == lv]))
           for lv in config.levels}
  report.append(f"fusion: auto labels fast share per level {share}, loss {loss:.3f}")
  # 4. Evaluation per mode and level.
  modes, levels = {}, np.asarray([t.level for t in evaluation])
  families = np.asarray([t.family for t in evaluation])

  def summary(passed, tokens, where):
    return {"accuracy": float(passed[where].mean()), "mean_tokens": float(tokens[where].mean())}

  for mode in MODES:
    passed, tokens, repaired, chosen = accuracy(state.params, mode, evaluation)
    modes[mode] = {str(lv): {**summary(passed, tokens, levels == lv),
                             "per_family": {f: summary(passed, tokens, (levels == lv) & (families == f))
                                            for f in config.families}} for lv in config.levels}
    line = f"{mode}: repaired {int(repaired.sum())} of {len(repaired)} replies"
    if mode == "auto":
      line += ", chose fast per level " + str({lv: float(np.mean([c == "fast" for c, l in zip(chosen, levels)
                                                                  if l == lv])) for lv in config.levels})
    report.append(line)
  if checkpoint_dir is not None:
    # A rerun into the same results folder replaces the student.
    save_replacing(checkpoint_dir, state, data_state={},
                   metadata={"model": model_config.to_dict(), "chat_format": "compact",
                             "task_config": dataclasses.asdict(TASK_CONFIG), "families": list(config.families),
                             "levels": list(config.levels)})
    report.append(f"student saved to {checkpoint_dir}")
  report.append(f"total {time.perf_counter() - begin:.0f} s")
  for line in report[-len(MODES) - 3:]:
    log(line)
  return {"iterations": iterations, "modes": modes}, "\n".join(f"- {line}" for line in report)
