"""Presets for examples.vit.finetune, one config per preset (big_vision style)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
  image_size: int            # a multiple of 14; 28 gives a 2x2 patch grid
  num_layers: int | None     # None: all 12 pre-trained blocks
  n_train: int               # MNIST-5k has 5,000 images in all
  n_val: int                 # ID validation: the only data the searches see
  n_test: int                # ID test, and the images that get corrupted
  n_digits: int | None       # sklearn digits used (None: all 1,797)
  severities: tuple[int, ...]
  batch_size: int
  steps: int
  learning_rate: float       # of the pre-trained backbone
  head_lr_multiplier: float  # the new head's learning rate, relative
  warmup_steps: int
  search_seed: int           # strengths are searched on this seed only...
  seeds: tuple[int, ...]     # ...and the chosen strength is run on all of these
  strengths: dict            # method -> candidate strengths
  eval_batch: int
  log_every: int
  checkpoint_every: int
  data_seed: int = 0         # the split and the corruptions; fixed across runs


# The strength means something different per method, so each gets its own
# grid: AdamW's decoupled decay is multiplied by the learning rate, L2-SP's
# alpha scales a gradient term before Adam normalises it, SPD's lambda is the
# fraction of the outward step taken back.
_STRENGTHS = {
    "adamw": (0.1, 1.0, 10.0),
    "l2sp": (0.1, 1.0, 10.0),
    "spd": (0.1, 0.5, 1.0),
}

PRESETS = {
    # Seconds, for the tests: the real weights and code path, two blocks only.
    "smoke": Config(
        image_size=28, num_layers=2, n_train=64, n_val=32, n_test=32, n_digits=32,
        severities=(3,), batch_size=8, steps=6, learning_rate=1e-4, head_lr_multiplier=10.0, warmup_steps=2,
        search_seed=0, seeds=(0,),
        strengths={"adamw": (0.1,), "l2sp": (1.0,), "spd": (1.0,)},
        eval_batch=32, log_every=2, checkpoint_every=2),
    # The full ViT-S/14 on a 2x2 patch grid: about 15 minutes on 2 CPU cores.
    "cpu": Config(
        image_size=28, num_layers=None, n_train=3500, n_val=250, n_test=250,
        n_digits=500, severities=(1, 3, 5), batch_size=16, steps=80,
        learning_rate=3e-5, head_lr_multiplier=10.0, warmup_steps=8, search_seed=0, seeds=(0, 1, 2),
        strengths=_STRENGTHS, eval_batch=250, log_every=10, checkpoint_every=40),
    # Same recipe at 112px (8x8 patches), all data, more steps and seeds.
    "gpu": Config(
        image_size=112, num_layers=None, n_train=3500, n_val=500, n_test=1000,
        n_digits=None, severities=(1, 2, 3, 4, 5), batch_size=64, steps=1500,
        learning_rate=2e-5, head_lr_multiplier=10.0, warmup_steps=100, search_seed=0, seeds=(0, 1, 2, 3, 4),
        strengths=_STRENGTHS, eval_batch=500, log_every=50, checkpoint_every=250),
}
