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
