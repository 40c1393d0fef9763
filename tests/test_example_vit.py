"""The ViT example: weight conversion against onnxruntime, HF safetensors
loading, and the training entry point end to end on the smoke preset.

The pinned wheels are downloaded once into $SPD_OPTAX_CACHE (default
~/.cache/spd_optax); later runs read the cache.
"""

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnx")
pytest.importorskip("safetensors")

from examples.vit import convert, finetune  # noqa: E402
from examples.vit.model import ViT, ViTConfig  # noqa: E402


@pytest.fixture(scope="module")
def onnx_file():
  return convert.onnx_path()


@pytest.fixture(scope="module")
def onnx_weights(onnx_file):
  return convert.read_onnx(onnx_file)


def _onnx_features_session(path):
  """The exported graph, cut after the backbone's final LayerNorm and with a
  free image size (the export fixed 224x224, but its graph computes every
  shape, including the position-embedding resize, from the input)."""
  import onnx
  import onnxruntime as ort

  model = onnx.load(str(path))
  image = model.graph.input[0].type.tensor_type.shape
  image.dim[2].dim_param, image.dim[3].dim_param = "height", "width"
  del model.graph.output[:]
  model.graph.output.append(onnx.helper.make_tensor_value_info(
      "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
  return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("image_size", [28, 224])
def test_converted_features_match_onnxruntime(onnx_file, onnx_weights, image_size):
  pytest.importorskip("onnxruntime")
  session = _onnx_features_session(onnx_file)
  x = np.random.default_rng(0).normal(size=(2, 3, image_size, image_size)).astype(np.float32)
  expected = session.run(None, {"input_image": x})[0]

  model = convert.pretrained_vit(*onnx_weights, image_size=image_size)
  got = np.asarray(model(x.transpose(0, 2, 3, 1)))

  assert got.shape == expected.shape == (2, 1 + (image_size // 14) ** 2, 384)
  rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert rel <= 1e-4, rel


def test_cubic_resize_is_identity_on_same_size_and_keeps_constants():
  mat = convert.cubic_resize_matrix(37, 5)
  np.testing.assert_allclose(mat.sum(axis=1), 1, atol=1e-12)
  np.testing.assert_allclose(convert.cubic_resize_matrix(6, 6), np.eye(6), atol=1e-12)


def _random_hf_checkpoint(rng, dim=32, layers=2, mlp=64, patch=14, grid=3):
  """A tiny state dict with HF Dinov2Model names and layouts."""
  t = lambda *shape: rng.normal(size=shape).astype(np.float32)
  sd = {
      "embeddings.cls_token": t(1, 1, dim),
      "embeddings.mask_token": t(1, dim),   # HF has it; the model doesn't use it
      "embeddings.position_embeddings": t(1, 1 + grid * grid, dim),
      "embeddings.patch_embeddings.projection.weight": t(dim, 3, patch, patch),
      "embeddings.patch_embeddings.projection.bias": t(dim),
      "layernorm.weight": t(dim), "layernorm.bias": t(dim),
  }
  for i in range(layers):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.attention.query": (dim, dim),
                         "attention.attention.key": (dim, dim),
                         "attention.attention.value": (dim, dim),
                         "attention.output.dense": (dim, dim),
                         "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp)}.items():
      sd[p + name + ".weight"] = t(o, n)   # HF Linear: [out, in]
      sd[p + name + ".bias"] = t(o)
    for name in ("norm1", "norm2"):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = t(dim), t(dim)
    sd[p + "layer_scale1.lambda1"] = t(dim)
    sd[p + "layer_scale2.lambda1"] = t(dim)
  return sd


def test_loads_hf_safetensors_checkpoint(tmp_path):
  from safetensors.numpy import save_file

  sd = _random_hf_checkpoint(np.random.default_rng(1))
  path = tmp_path / "model.safetensors"
  save_file(sd, str(path))
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "dinov2", "num_attention_heads": 4, "layer_norm_eps": 1e-6,
       "patch_size": 14}))

  loaded, hf_config = convert.read_safetensors(path)
  model = convert.pretrained_vit(loaded, hf_config, image_size=42, num_classes=10)
  assert model.cfg == ViTConfig(dim=32, num_layers=2, num_heads=4, mlp_dim=64,
                                patch_size=14, grid=(3, 3), num_classes=10)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  # Every tensor lands where it should, transposed from HF's [out, in].
  np.testing.assert_array_equal(params["cls_token"], sd["embeddings.cls_token"])
  np.testing.assert_array_equal(params["pos_embed"], sd["embeddings.position_embeddings"])
  np.testing.assert_array_equal(
      params["patch_embed"]["kernel"],
      sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["norm"]["scale"], sd["layernorm.weight"])
  for i in range(2):
    block, p = params["blocks"][i], f"encoder.layer.{i}."
    for ours, theirs in {"query": "attention.attention.query", "key": "attention.attention.key",
                         "value": "attention.attention.value", "out": "attention.output.dense",
                         "fc1": "mlp.fc1", "fc2": "mlp.fc2"}.items():
      np.testing.assert_array_equal(block[ours]["kernel"], sd[p + theirs + ".weight"].T)
      np.testing.assert_array_equal(block[ours]["bias"], sd[p + theirs + ".bias"])
    np.testing.assert_array_equal(block["ls1"], sd[p + "layer_scale1.lambda1"])
    np.testing.assert_array_equal(block["ls2"], sd[p + "layer_scale2.lambda1"])
    np.testing.assert_array_equal(block["norm2"]["bias"], sd[p + "norm2.bias"])

  # A different image size resizes only the patch part of the position embedding.
  small = convert.pretrained_vit(loaded, hf_config, image_size=28)
  pos = np.asarray(small.pos_embed[...])
  assert pos.shape == (1, 5, 32)
  np.testing.assert_array_equal(pos[:, 0], sd["embeddings.position_embeddings"][:, 0])
  assert np.isfinite(np.asarray(small(np.zeros((1, 28, 28, 3), np.float32)))).all()


def test_l2_sp_pulls_gradient_toward_anchor():
  import jax.numpy as jnp
  tx = finetune.l2_sp(0.5)
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  moved = {"w": jnp.array([3.0, 2.0])}
  updates, _ = tx.update({"w": jnp.zeros(2)}, state, moved)
  np.testing.assert_allclose(updates["w"], [1.0, 0.0])


def _check_results(results_dir):
  for name in ("vit", "vit_summary", "vit_shifts", "vit_search"):
    for ext in ("json", "md", "png"):
      assert (results_dir / f"{name}.{ext}").exists(), f"{name}.{ext}"
  rows = json.loads((results_dir / "vit.json").read_text())
  assert {r["method"] for r in rows} == set(finetune.METHODS.values())
  for r in rows:
    assert 0 <= r["id_acc"] <= 100 and 0 <= r["ood_mean"] <= 100
    assert "sklearn_digits" in r and "elastic-3" in r
    assert r["deviation"] > 0
  table = (results_dir / "vit_summary.md").read_text()
  for method in finetune.METHODS.values():
    assert method in table


def test_smoke_run_then_resume(tmp_path, onnx_weights, caplog):
  results = tmp_path / "results"
  argv = ["--preset", "smoke", "--results-dir", str(results)]

  # Interrupted in the middle of the second run (smoke: 6 steps a run,
  # checkpoints every 2): the first run is finished, the second has a
  # checkpoint at step 2.
  with pytest.raises(finetune.Interrupted):
    finetune.main(argv + ["--interrupt-after", "9"])
  assert not (results / "vit.json").exists()

  with caplog.at_level("INFO"):
    out = finetune.main(argv + ["--resume"])
  assert out["resumed"] == {"l2sp_s1_seed0": 2}
  _check_results(results)
  # The output is the progress bars and the results: nothing logs a warning.
  # Except one: this preset saves every 2 steps, faster than a busy disk
  # writes, and then Orbax rightly reports the wait for the previous save
  # (test_common checks that the Checkpointer itself causes no such report).
  noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
           and not r.getMessage().startswith("Waiting for previous save")]
  assert not noise, noise

  spd = [r for r in out["finals"] if r["key"] == "spd"][0]
  logged = spd["history"][-1]
  assert {"spd_decayed_fraction", "spd_mean_ratio", "spd_deviation"} <= set(logged)
  # SPD's own ‖θ-θ₀‖ (SPD leaves = the backbone) agrees with the example's.
  np.testing.assert_allclose(logged["spd_deviation"], logged["deviation"], rtol=1e-3)
  # Checkpoints of finished methods are removed; the numbers are on disk.
  assert not any((results / "checkpoints").glob("*/*"))


def test_resumed_run_matches_uninterrupted(tmp_path):
  """Resuming restores params, Adam moments and the SPD anchor exactly."""
  whole = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "a"),
                         "--methods", "spd"])
  with pytest.raises(finetune.Interrupted):
    finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "b"),
                   "--methods", "spd", "--interrupt-after", "3"])
  resumed = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "b"),
                           "--methods", "spd", "--resume"])
  assert resumed["resumed"] == {"spd_s1_seed0": 2}
  a, b = whole["finals"][0], resumed["finals"][0]
  np.testing.assert_allclose(b["deviation"], a["deviation"], rtol=1e-5)
  assert b["id_acc"] == a["id_acc"] and b["ood"] == a["ood"]
  assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]]


def test_study_smoke_end_to_end_with_resume(tmp_path, onnx_weights):
  """The study's whole code path (probe, strength grids, frontier, other
  seeds, intervals, figures) on the tiny preset, interrupted and resumed."""
  results = tmp_path / "study"
  argv = ["--preset", "study-smoke", "--results-dir", str(results)]
  # study-smoke: 4 steps a run, checkpoints every 2. Plain Adam (4 steps),
  # then AdamW stops after its 2nd step, just after its checkpoint.
  with pytest.raises(finetune.Interrupted):
    finetune.main(argv + ["--interrupt-after", "6"])
  out = finetune.main(argv + ["--resume"])
  assert out["resumed"] == {"adamw_s1_seed0": 2}

  for name in ("study.md", "study.json", "study_sensitivity.png", "study_frontier.png",
               "study_layers.png", "vit_timing.json"):
    assert (results / name).exists(), name
  cfg = finetune.STUDY_PRESETS["study-smoke"]
  assert {k: len(v) for k, v in out["finals"].items()} == {
      k: len(cfg.seeds) for k in ("adam", "adamw", "l2sp", "spd")}
  assert [d["comparison"] for d in out["differences"]] == [
      "Adam-SPD − AdamW", "Adam-SPD − L2-SP", "Adam-SPD − Adam"]
  for d in out["differences"]:
    for metric in ("ID", "mean OOD"):
      assert d[metric]["lo"] <= d[metric]["diff"] <= d[metric]["hi"]
  # Grid points are scored on the first side_eval images of each test set,
  # the chosen ones then on all of them (the intervals use seed 0 too).
  for key, runs in out["grid"].items():
    for r in runs:
      chosen = r["strength"] == out["chosen"][key]
      assert len(r["preds"]["fonts"]) == (cfg.n_ood if chosen else cfg.side_eval)
      assert ("grid_point" in r) == chosen
  # The frontier: every α per method; α = 1 is the trained run itself, on
  # the same images as the other points.
  for front in out["frontier"]:
    assert [p["alpha"] for p in front["points"]] == list(cfg.alphas)
    run = next(r for r in out["grid"][front["key"]] if r["strength"] == out["chosen"][front["key"]])
    assert front["points"][-1]["test"] == run["grid_point"]["test"]
  # SPD's per-block state was logged every log_every steps and at the last,
  # one entry per block; plain Adam's validation curve kept its own period.
  spd = out["finals"]["spd"][0]
  assert [h["step"] for h in spd["history"]] == [3, 4]
  logged = [h["spd_blocks"] for h in spd["history"]]
  assert set(logged[-1]) == {"embed", "block 0", "block 1", "final norm"}
  adam = out["grid"]["adam"][0]["history"]
  assert [h["step"] for h in adam if "val_acc" in h] == [2, 4]
  assert all(0 <= v["pulled"] <= 1 for h in logged for v in h.values())
  assert set(spd["block_deviation"]) == set(logged[-1])
  timing = json.loads((results / "vit_timing.json").read_text())["parts"]
  total = timing.pop("total")
  # One clock reading per boundary: the parts add up to the total to float
  # rounding (two readings in a row differ by far more than 1e-9 of it).
  assert sum(timing.values()) == pytest.approx(total, rel=1e-9)
  assert timing["forward/backward"] > 0 and timing["optimizer step"] > 0
  assert timing["evaluation"] > 0
  # Parts are disjoint: "other" is what they leave of the total.
  assert all(v >= 0 for v in timing.values()), timing
  # Finished runs leave no checkpoints, and the seed-0 weights are gone.
  assert not any((results / "checkpoints").glob("*/*"))
  assert not any((results / "runs").glob("*.npz"))
