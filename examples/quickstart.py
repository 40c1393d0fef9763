"""Quick start: pre-train a small MLP on one task, fine-tune it on a shifted
one with optax.adamw and with spd_optax.adam_spd, and compare what each keeps.

  python -m examples.quickstart

Runs in seconds on a CPU. Prints accuracy on the fine-tuning task (ID) and on
the pre-training task (what was kept), and ‖θ - θ_0‖ from the pre-trained
weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import spd_optax

DIM, CLASSES = 16, 4


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(DIM, 64, rngs=rngs)
    self.out = nnx.Linear(64, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.hidden(x)))


def make_task(key, teacher, shift, n):
  """Inputs around `shift`, labelled by a fixed random teacher network."""
  x = jax.random.normal(key, (n, DIM)) + shift
  return x, jnp.argmax(jnp.tanh(x @ teacher[0]) @ teacher[1], axis=-1)


def train(model, tx, data, steps, batch=64, seed=0):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  # nnx.cached_partial walks the model and optimizer graphs once, not at
  # every call: most of a small model's step time otherwise.
  cached_step = nnx.cached_partial(step, model, opt)
  rng = np.random.default_rng(seed)
  x, y = map(np.asarray, data)  # batches drawn in NumPy: no op per index
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    cached_step(x[idx], y[idx])
  return opt


def accuracy(model, data):
  x, y = data
  return float(jnp.mean(jnp.argmax(model(x), -1) == y))


def distance(model, reference):
  diff = jax.tree.map(lambda a, b: a - b, nnx.state(model, nnx.Param),
                      nnx.state(reference, nnx.Param))
  return float(optax.tree_utils.tree_norm(diff))


def main():
  keys = jax.random.split(jax.random.key(0), 8)
  teacher_a = (jax.random.normal(keys[0], (DIM, 32)), jax.random.normal(keys[1], (32, CLASSES)))
  # The new task: same kind of inputs moved over, and a teacher that agrees
  # only in part with the old one.
  teacher_b = (teacher_a[0] + 0.5 * jax.random.normal(keys[2], (DIM, 32)), teacher_a[1])
  shift_b = 1.0 * jax.random.normal(keys[3], (DIM,))
  pre_train = make_task(keys[4], teacher_a, 0.0, 8192)
  pre_test = make_task(keys[5], teacher_a, 0.0, 2048)
  fine_train = make_task(keys[6], teacher_b, shift_b, 256)
  fine_test = make_task(keys[7], teacher_b, shift_b, 2048)

  pretrained = MLP(nnx.Rngs(0))
  train(pretrained, optax.adam(3e-3), pre_train, steps=3000)
  print(f"pre-trained: old-task accuracy {accuracy(pretrained, pre_test):.3f}, "
        f"new-task accuracy {accuracy(pretrained, fine_test):.3f}")

  methods = {
      "optax.adamw": optax.adamw(1e-3, weight_decay=0.1),
      "spd_optax.adam_spd": spd_optax.adam_spd(1e-3, weight_decay=1.0),
  }
  print(f"{'fine-tuned with':<20} {'new task (ID)':>14} {'old task':>9} {'‖θ-θ0‖':>8}")
  for name, tx in methods.items():
    model = nnx.clone(pretrained)
    opt = train(model, tx, fine_train, steps=300, seed=1)
    line = (f"{name:<20} {accuracy(model, fine_test):>14.3f} "
            f"{accuracy(model, pre_test):>9.3f} {distance(model, pretrained):>8.3f}")
    if name.startswith("spd"):
      stats = spd_optax.spd_stats(opt.opt_state)
      line += f"   (last step: {float(stats['decayed_fraction']):.0%} of leaves decayed)"
    print(line)


if __name__ == "__main__":
  main()
