"""Presets for `python -m examples.llm.finetune --preset NAME`.

`cpu` is sized to finish in under 15 minutes on a 2-core CPU (measured
times: docs/examples/llm.md). `smoke` runs
the real weights truncated to two blocks, for the tests. `gpu` is the same
experiment at a size worth drawing conclusions from.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What both LLM examples set alike: the data, its windows, and the
  training schedule's fields (full_configs.FullConfig changes defaults)."""
  # Model: None keeps every block; a number keeps only the first blocks.
  n_layers: int | None = None
  # Data: fine-tune on whole books; held-out chapters of the same books are ID.
  id_books: tuple[str, ...] = ("psalms", "proverbs")
  ood_books: tuple[str, ...] = ("genesis", "mark", "acts")
  heldout_fraction: float = 0.1
  val_fraction: float = 0.05
  split_seed: int = 0
  seq_len: int = 64
  batch_size: int = 4
  eval_batch_size: int = 8
  eval_windows: int = 32               # per evaluation set, windows of seq_len
  # Training.
  steps: int = 48
  learning_rate: float = 1e-3
  warmup_steps: int = 4
  adamw_weight_decay: tuple[float, ...] = (0.1,)
  spd_strength: tuple[float, ...] = (1.0,)
  seeds: tuple[int, ...] = (0, 1)
  log_every: int = 8
  checkpoint_every: int = 16


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  lora_rank: int = 8
  lora_layers: int | None = None       # adapt the top N blocks (None: all)
  lora_attn: bool = True               # q/k/v/o projections
  lora_mlp: bool = True                # gate/up/down projections


PRESETS = {
    "smoke": Config(n_layers=2, lora_rank=4, lora_layers=None, seq_len=32,
                    batch_size=2, eval_batch_size=2, eval_windows=2, steps=4,
                    warmup_steps=1, seeds=(0,), log_every=2, checkpoint_every=2),
    # Adapters in the top 8 blocks only: backpropagating through all 30 blocks
    # would cost 2.5x per step on a CPU. Two seeds per method at one strength
    # each (no strength search: it does not fit in 15 CPU minutes).
    "cpu": Config(lora_layers=8),
    # Adapters everywhere, longer windows, more steps, and a small strength
    # grid per method, selected on the ID validation chapters.
    "gpu": Config(lora_rank=16, seq_len=256, batch_size=16, eval_batch_size=32,
                  eval_windows=256, steps=1500, learning_rate=5e-4,
                  warmup_steps=50, adamw_weight_decay=(0.01, 0.1, 1.0),
                  spd_strength=(0.25, 0.5, 1.0), seeds=(0, 1, 2), log_every=50,
                  checkpoint_every=250),
}




@dataclasses.dataclass(frozen=True)
class StudyConfig(Config):
  """The `study` preset (examples/llm/study.py): a strength search per method
  on seed 0, the chosen strengths on every seed, per-window NLLs for paired
  intervals, and the interpolation frontier."""
  strengths: dict = dataclasses.field(default_factory=dict)  # method -> nonzero grid
  alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)   # W0 + α·ΔW
  n_boot: int = 10_000


STUDY_PRESETS = {
    # 11 runs of 48 steps plus their evaluations, sized from the `cpu`
    # preset's costs on 2 CPU cores to fit 45 minutes (measured time:
    # docs/examples/llm.md).
    "study": StudyConfig(
        lora_layers=8, eval_windows=64, seeds=(0, 1, 2), checkpoint_every=24,
        strengths={"adamw": (0.1, 1.0, 10.0), "adam_spd": (0.25, 0.5, 1.0)}),
    "study-smoke": StudyConfig(
        n_layers=2, lora_rank=4, seq_len=32, batch_size=2, eval_batch_size=2,
        eval_windows=4, steps=4, warmup_steps=1, seeds=(0, 1), log_every=2,
        checkpoint_every=2, strengths={"adamw": (0.1,), "adam_spd": (0.5, 1.0)},
        alphas=(0.0, 0.5, 1.0), n_boot=200),
}


def get_config(preset: str) -> Config:
  presets = PRESETS | STUDY_PRESETS
  if preset not in presets:
    raise KeyError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
  return presets[preset]
