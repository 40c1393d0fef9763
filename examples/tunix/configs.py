"""Presets for `python -m examples.tunix.train --preset NAME`.

The data fields (books, ID/OOD split, windows) are examples/llm's
(`configs.ExperimentConfig`), so both examples fine-tune and score on the
same text. `smoke` is the tests' preset (two blocks, a few steps); `cpu`
is sized for minutes on 2 CPU cores; `gpu` is the same experiment at a
size worth drawing conclusions from (not run).
"""

import dataclasses

from examples.llm.configs import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  # Which fine-tunings to run: "lora" trains qwix LoRA adapters on every
  # projection (SPD with anchor="zeros"); "full" trains every weight (SPD
  # with anchor="params").
  modes: tuple[str, ...] = ("lora", "full")
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_modules: str = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"
  # Full fine-tuning's learning rate (the LoRA runs use `learning_rate`).
  full_learning_rate: float = 5e-5
  # Regexes over parameter paths ("layers/3/attn/q_proj/w") that full
  # fine-tuning leaves out of SPD: weights with no pre-trained value to be
  # pulled back to (a new head, new tokens' rows). SFT of SmolLM2 adds none.
  spd_exclude: tuple[str, ...] = ()
  # Devices of a ("fsdp", "tp") mesh; 1: no mesh. On CPU, make N host
  # devices with XLA_FLAGS=--xla_force_host_platform_device_count=N.
  fsdp: int = 1
  remat: bool = False


PRESETS = {
    "smoke": Config(n_layers=2, lora_rank=4, seq_len=32, batch_size=2, eval_batch_size=2,
                    eval_windows=2, steps=4, warmup_steps=1, seeds=(0,), log_every=2,
                    checkpoint_every=2),
    # All 30 blocks, one seed per method and mode: four training runs of 32
    # steps of 4 x 64 tokens, each scored on 32 windows per evaluation set.
    "cpu": Config(steps=32, seeds=(0,), log_every=8, checkpoint_every=16),
    # Not run: longer windows and training, strength grids, three seeds.
    "gpu": Config(lora_rank=16, seq_len=256, batch_size=16, eval_batch_size=32,
                  eval_windows=256, steps=1500, learning_rate=5e-4, full_learning_rate=2e-5,
                  warmup_steps=50, adamw_weight_decay=(0.01, 0.1, 1.0),
                  spd_strength=(0.25, 0.5, 1.0), seeds=(0, 1, 2), log_every=50,
                  checkpoint_every=250, remat=True),
}


def get_config(preset: str) -> Config:
  if preset not in PRESETS:
    raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  return PRESETS[preset]
