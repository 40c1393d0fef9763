"""Presets for `python -m examples.llm.full_finetune --preset NAME`.

Full fine-tuning of SmolLM2-135M (scanned blocks, every weight trained) on
the same KJV data as the LoRA example (`configs.py`). Batches are sharded
along the mesh's one axis, so `batch_size` and `eval_batch_size` must be
multiples of the number of devices.
"""

import dataclasses

from examples.llm.configs import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class FullConfig(ExperimentConfig):
  """The LoRA example's data fields (configs.ExperimentConfig), with the
  mesh and the defaults of full fine-tuning."""
  layer_axis: int = 0                  # 1: MaxText's layout, layers at axis 1
  # Mesh: one axis, "fsdp", over this many devices (params, optimizer state
  # and the batch all sharded along it).
  devices: int = 8
  # Every weight trains, from the pre-trained ones: a lower learning rate;
  # the same schedule for every method (warm-up, cosine to 10%).
  batch_size: int = 8
  steps: int = 32
  learning_rate: float = 5e-5
  seeds: tuple[int, ...] = (0,)        # batch order (full fine-tuning has no random init)
  log_every: int = 4


PRESETS = {
    # The tests' preset: real weights truncated to 2 blocks, a few steps.
    "smoke": FullConfig(n_layers=2, seq_len=16, batch_size=8, eval_batch_size=32,
                        eval_windows=8, steps=4, warmup_steps=1, learning_rate=1e-4,
                        adamw_weight_decay=(0.1, 1.0), log_every=1, checkpoint_every=2),
    # All 30 blocks on 8 CPU devices, sized to about 15 minutes on 2 CPU
    # cores. On a CPU mesh a step costs mostly its FSDP collectives (every
    # "device" gathers the whole model into host RAM), not its tokens: a step
    # of 16 x 32 tokens took 8.3-8.6 s, one of 8 x 32 6.5-8 s (load average
    # 5-8), and one evaluation batch of 64 windows 5-8 s where 8 batches of 8
    # took 23 s. So: wide batches, all evaluation sets in one batch of 64, 16
    # steps; AdamW's strength searched on seed 0's ID validation, the chosen
    # AdamW and SPD rerun on a second batch order.
    "cpu": FullConfig(seq_len=32, batch_size=16, eval_batch_size=64, eval_windows=16,
                      steps=16, warmup_steps=2, adamw_weight_decay=(0.1, 1.0),
                      seeds=(0, 1), log_every=2, checkpoint_every=8),
    # For an accelerator (not run yet): longer windows and training, strength
    # grids for both methods selected on validation, three seeds.
    "gpu": FullConfig(seq_len=256, batch_size=32, eval_batch_size=32, eval_windows=256,
                      steps=1500, learning_rate=2e-5, warmup_steps=50,
                      adamw_weight_decay=(0.01, 0.1, 1.0), spd_strength=(0.25, 0.5, 1.0),
                      seeds=(0, 1, 2), log_every=50, checkpoint_every=250),
}


def get_config(preset: str) -> FullConfig:
  if preset not in PRESETS:
    raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  return PRESETS[preset]
