"""Tests of the full fine-tuning example (examples/llm/full_finetune.py): the
scanned model against the unscanned one, per-layer SPD, the mesh, and
checkpoints.

Needs the `examples` extras and the pinned wheels, as tests/test_example_llm.py."""

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import spd_optax
from examples.llm import convert, scan_model


@pytest.fixture(scope="module")
def smollm2():
  cfg, tok, weights = convert.read_gguf(convert.smollm2_gguf_path())
  return cfg, tok, weights


def _prompt(tok):
  return jnp.asarray([tok.encode("In the beginning God created the heaven and the earth.").ids])


def test_scanned_model_matches_unscanned_logits(smollm2):
  cfg, tok, weights = smollm2
  tokens = _prompt(tok)
  ref = np.asarray(convert.build_model(cfg, weights)(tokens))
  scanned = scan_model.build_scan_model(cfg, weights)
  assert scanned.blocks.q_proj.shape == (30, 576, 576)
  got = np.asarray(scanned(tokens))
  # Same float32 maths in another order (scan vs unrolled loop, einsum vs
  # nnx.Linear): equal to rounding, far below the logits' scale (~20).
  np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
  assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("layer_axis", [0, 1])
def test_layer_axes_read_off_the_scan(smollm2, layer_axis):
  cfg, tok, weights = smollm2
  model = scan_model.build_scan_model(cfg, weights, n_layers=3, layer_axis=layer_axis)
  tokens = _prompt(tok)
  np.testing.assert_allclose(np.asarray(model(tokens)),
                             np.asarray(convert.build_model(cfg, weights, n_layers=3)(tokens)),
                             atol=2e-4, rtol=0)
  axes = nnx.to_pure_dict(spd_optax.layer_axes_from_names(nnx.state(model, nnx.Param)))
  assert axes["embed_tokens"] is None and axes["norm"] is None
  assert set(axes["blocks"].values()) == {layer_axis}
  shape = model.blocks.gate_proj.shape
  assert shape[layer_axis] == 3 and shape == ((3, 576, 1536) if layer_axis == 0 else (576, 3, 1536))


def test_bad_layer_axis_and_missing_weight_fail_clearly(smollm2):
  cfg, _, weights = smollm2
  with pytest.raises(ValueError, match="layer_axis must be 0 or 1"):
    scan_model.build_scan_model(cfg, weights, n_layers=2, layer_axis=2)
  partial = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    scan_model.build_scan_model(cfg, partial, n_layers=2)


# --- the training script on the smoke preset ----------------------------------

from examples.llm import full_configs, full_finetune  # noqa: E402

SMOKE = full_configs.get_config("smoke")


@pytest.fixture(scope="module")
def contexts(smollm2):
  """The smoke model on 8 devices and on 1; built once, shared (θ0 is never donated)."""
  cfg, tok, weights = smollm2
  import dataclasses
  return {n: full_finetune.build_context(dataclasses.replace(SMOKE, devices=n), cfg, tok, weights)
          for n in (8, 1)}


@pytest.fixture(scope="module")
def spd_run_8(contexts, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("spd8")
  row, nll = full_finetune.run_one(contexts[8], SMOKE, "adam_spd", 1.0, 0, SMOKE.steps, run_dir)
  return run_dir, row, nll


def _history(run_dir):
  import json
  return json.loads((run_dir / "history.json").read_text())


def test_params_and_state_are_fsdp_sharded_on_an_explicit_mesh(contexts):
  ctx = contexts[8]
  assert all(t == jax.sharding.AxisType.Explicit for t in ctx["mesh"].axis_types)
  q = ctx["theta0"]["blocks"]["q_proj"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert len({str(s.index) for s in q.addressable_shards}) == 8   # 8 distinct pieces
  tx = full_finetune.make_tx(SMOKE, "adam_spd", 1.0, 4, ctx["theta0"], ctx["layer_axes"])
  ssh = full_finetune.state_shardings(tx, ctx["theta0"], ctx["psh"], ctx["mesh"])
  state = jax.eval_shape(tx.init, ctx["theta0"])
  anchor = optax.tree_utils.tree_get(state, "anchor")
  assert anchor["blocks"]["q_proj"].shape == q.shape
  ssh_anchor = optax.tree_utils.tree_get(ssh, "anchor")
  assert ssh_anchor["blocks"]["q_proj"].spec == q.sharding.spec
  # Masked off (norms, embedding): no anchor stored.
  assert isinstance(anchor["embed_tokens"], optax.MaskedNode)
  assert isinstance(anchor["blocks"]["input_layernorm"], optax.MaskedNode)


def test_spd_acts_per_block(spd_run_8):
  run_dir, row, _ = spd_run_8
  hist = _history(run_dir)
  ratio = np.asarray(hist[-1]["ratio"])
  assert ratio.shape == (len(full_finetune.MATRICES), SMOKE.n_layers)  # per matrix, per block
  assert np.asarray(hist[-1]["block_deviation"]).shape == ratio.shape
  assert all(np.isfinite(v) for k, v in row.items() if k.endswith("_ppl"))
  # Step 1 starts at θ0: c = 0, nothing decayed, but later steps move.
  assert hist[0]["decayed_fraction"] == 0.0
  assert row["deviation"] > 0


def test_one_device_gives_the_same_numbers(contexts, spd_run_8, tmp_path):
  run_dir8, row8, nll8 = spd_run_8
  row1, nll1 = full_finetune.run_one(contexts[1], SMOKE, "adam_spd", 1.0, 0, SMOKE.steps,
                                     tmp_path / "spd1")
  # Sharded sums run in another order: equal to float32 rounding, not bitwise.
  for k in nll8:
    np.testing.assert_allclose(nll1[k], nll8[k], rtol=2e-5)
  h1, h8 = _history(tmp_path / "spd1"), _history(run_dir8)
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h8], rtol=2e-5)
  np.testing.assert_allclose(h1[-1]["block_deviation"], h8[-1]["block_deviation"],
                             rtol=1e-3, atol=1e-6)
  assert [h["decayed_fraction"] for h in h1] == [h["decayed_fraction"] for h in h8]


def test_resumed_run_ends_bit_exact(contexts, spd_run_8, tmp_path):
  import json
  run_dir8, row8, _ = spd_run_8
  ctx, run_dir = contexts[8], tmp_path / "resumed"
  assert full_finetune.run_one(ctx, SMOKE, "adam_spd", 1.0, 0, SMOKE.steps, run_dir,
                               stop_after=2) is None
  row, _ = full_finetune.run_one(ctx, SMOKE, "adam_spd", 1.0, 0, SMOKE.steps, run_dir,
                                 resume=True)
  done = json.loads((run_dir / "result.json").read_text())
  want = json.loads((run_dir8 / "result.json").read_text())
  assert done["final_params_checksum"] == want["final_params_checksum"]
  assert done["nll"] == want["nll"]
  assert _history(run_dir) == _history(run_dir8)


def test_entry_point_writes_reports_and_plots(tmp_path):
  out = tmp_path / "out"
  # Two steps on one device are enough for a strength to be selected and
  # every report written: the runs' numbers, on the mesh and on one device,
  # are tested above (a CPU mesh costs a step about 4x one device's).
  rows = full_finetune.main(["--preset", "smoke", "--steps", "2", "--devices", "1",
                             "--results-dir", str(out)])
  methods = [r["method"] for r in rows]
  assert methods == ["pretrained", "adamw", "adamw", "adam_spd"]
  assert sum(r.get("selected") is True for r in rows if r["method"] == "adamw") == 1
  for name in ("llm_full.md", "llm_full.png", "llm_full_heatmap.png",
               "llm_full_block_deviation.png", "llm_full_differences.json"):
    assert (out / name).stat().st_size > 0


def test_bad_batch_for_the_mesh_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match="not a multiple of the 3 devices"):
    full_finetune.main(["--preset", "smoke", "--devices", "3", "--results-dir", str(tmp_path)])
