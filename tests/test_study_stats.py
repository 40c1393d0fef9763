"""The ViT study's statistics and per-layer helpers, on synthetic numbers
whose answer is known (no model, no data: fast)."""

import numpy as np
import pytest

from examples import stats
from examples.vit import study, study_report


def test_identical_methods_give_a_degenerate_interval_at_zero():
  a = np.random.default_rng(0).integers(0, 2, size=(5, 300)).astype(float)
  res = stats.paired_bootstrap(a, a.copy(), n_boot=500)
  assert res == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "excludes_zero": False}


def test_constant_shift_gives_the_shift():
  b = np.random.default_rng(1).normal(size=(5, 200))
  res = stats.paired_bootstrap(b + 3.0, b, n_boot=500)
  np.testing.assert_allclose([res["diff"], res["lo"], res["hi"]], 3.0, atol=1e-9)
  assert res["excludes_zero"]


def test_pairing_cancels_what_the_methods_share():
  """Hard and easy images are shared: paired, the interval is narrow even
  though each method's accuracy varies a lot over images and seeds."""
  rng = np.random.default_rng(2)
  shared = rng.normal(size=(5, 1)) * 10 + rng.normal(size=(1, 1000)) * 30
  res = stats.paired_bootstrap(shared + 1.0 + rng.normal(size=shared.shape) * 0.1, shared,
                               n_boot=1000)
  assert res["excludes_zero"] and res["hi"] - res["lo"] < 0.1


def test_one_seed_width_matches_the_standard_error():
  """With one seed only the images vary: the 95% interval is ±1.96 SE."""
  rng = np.random.default_rng(3)
  a = (rng.random((1, 4000)) < 0.7).astype(float)
  b = (rng.random((1, 4000)) < 0.6).astype(float)
  d = a - b
  res = stats.paired_bootstrap(a, b, n_boot=4000)
  expected = 2 * 1.96 * d.std() / np.sqrt(d.size)
  assert abs((res["hi"] - res["lo"]) / expected - 1) < 0.1
  np.testing.assert_allclose(res["diff"], d.mean())


def test_strata_weigh_sets_equally():
  """The mean over two sets of different sizes is the mean of set means."""
  a = np.concatenate([np.ones((2, 10)), np.zeros((2, 30))], axis=1)
  strata = [np.arange(10), np.arange(10, 40)]
  res = stats.paired_bootstrap(a, np.zeros_like(a), strata=strata, n_boot=200)
  assert res["diff"] == pytest.approx(0.5)
  assert res["lo"] == pytest.approx(0.5) and res["hi"] == pytest.approx(0.5)


def test_coverage_on_bernoulli_data_with_seed_and_image_effects():
  """Data drawn many times from a model with a known difference (2 points),
  per-image difficulty shared by both methods, and a per-seed effect of its
  own for each method: the 95% interval must contain 2 points in most draws.
  Pooling the seeds as if they were more images (ignoring the seed-to-seed
  variance) covers clearly less often on the same draws, which is what this
  test would catch."""
  rng = np.random.default_rng(4)
  true, trials = 0.02, 100
  covered = pooled = 0
  for t in range(trials):
    ease = rng.uniform(0.35, 0.65, size=300)           # per image, shared
    shared = rng.normal(scale=0.05, size=(5, 1))        # per seed, shared
    pa = ease + true + shared + rng.normal(scale=0.06, size=(5, 1))
    pb = ease + shared
    a = (rng.random((5, 300)) < pa).astype(float)
    b = (rng.random((5, 300)) < pb).astype(float)
    res = stats.paired_bootstrap(a, b, n_boot=400, seed=t)
    covered += res["lo"] <= true <= res["hi"]
    naive = stats.paired_bootstrap(a.reshape(1, -1), b.reshape(1, -1), n_boot=400, seed=t)
    pooled += naive["lo"] <= true <= naive["hi"]
  assert covered / trials >= 0.88, covered / trials
  assert pooled / trials <= covered / trials - 0.1, (pooled / trials, covered / trials)


def test_binomial_halfwidth():
  assert stats.binomial_halfwidth(50, 100) == pytest.approx(9.8)
  assert stats.binomial_halfwidth(100, 1000) == 0


def test_interpolation_endpoints_and_midpoint():
  params = {"w": np.array([2.0, 4.0]), "b": np.array([1.0])}
  anchor = {"w": np.array([0.0, 2.0]), "b": np.array([3.0])}
  for alpha, want in ((0, anchor), (1, params), (0.5, {"w": [1.0, 3.0], "b": [2.0]})):
    got = study.interpolate(params, anchor, alpha)
    for k in params:
      np.testing.assert_allclose(got[k], want[k])


def test_blocks_and_per_block_distance():
  assert study.block_of("['blocks'][11]['fc1']['kernel']") == "block 11"
  assert study.block_of("['pos_embed']") == "embed"
  assert study.block_of("['norm']['scale']") == "final norm"
  assert study.block_of("['head']['kernel']") is None
  assert study.block_order({"final norm", "block 10", "block 2", "embed"}) == [
      "embed", "block 2", "block 10", "final norm"]
  anchor = {"blocks": {0: {"w": np.zeros(2)}, 1: {"w": np.zeros(1)}}, "cls_token": np.zeros(1)}
  params = {"blocks": {0: {"w": np.array([3.0, 4.0])}, 1: {"w": np.ones(1)}},
            "cls_token": np.zeros(1)}
  assert study.per_block_distance(params, anchor) == {"block 0": 5.0, "block 1": 1.0, "embed": 0.0}


def test_heatmap_matrix_averages_runs_per_block_and_step():
  def run(pulled):
    return {"history": [{"step": s, "spd_blocks": {"block 0": {"pulled": p, "ratio": 0},
                                                   "embed": {"pulled": 1 - p, "ratio": 0}}}
                        for s, p in zip((2, 4), pulled)] + [{"step": 6}]}
  blocks, steps, mat = study_report.spd_heatmap_matrix([run((1.0, 0.0)), run((0.5, 0.0))])
  assert blocks == ["embed", "block 0"] and steps == [2, 4]
  np.testing.assert_allclose(mat, [[0.25, 1.0], [0.75, 0.0]])
