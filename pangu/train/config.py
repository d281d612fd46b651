"""Training hyper-parameters: optimizer, schedule, clipping, accumulation, loss options."""

import dataclasses

from pangu.train.spikes import SpikeConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """AdamW with linear warmup and cosine decay (Pangu Ultra recipe defaults: betas (0.9, 0.95), eps 1e-8,
  weight decay 0.1, global-norm clip 1.0).

  Attributes:
    peak_lr, end_lr: schedule endpoints; warmup_steps linear from 0, then cosine to end_lr at total_steps.
    grad_accum_steps: micro-batches per step; the global batch must divide evenly into them.
    clip_norm: global-norm clip threshold (grad norms are logged before clipping).
    decay_norm_gains: apply weight decay to RMSNorm gains too (the paper's Fig. 10 suggests it).
    z_loss: coefficient of the logsumexp^2 auxiliary loss.
  """

  peak_lr: float = 3e-4
  end_lr: float = 3e-5
  warmup_steps: int = 100
  total_steps: int = 1000
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  decay_norm_gains: bool = True
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  spikes: SpikeConfig = SpikeConfig()

  def __post_init__(self):
    for name in ("peak_lr", "clip_norm", "eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
    for name in ("end_lr", "weight_decay", "z_loss", "warmup_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
    if self.total_steps <= self.warmup_steps:
      raise ValueError(f"TrainConfig.total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps}")
    if self.grad_accum_steps < 1:
      raise ValueError(f"TrainConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps!r}")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
