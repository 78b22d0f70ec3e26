# %% [markdown]
# # From a trained Sparse-IFT model to fast inference: fold, compress, export
#
# A Sparse-IFT member trains a bigger, sparse network with the dense model's
# FLOPs. Three of the four members are linear at inference time and fold back
# into the layer they replaced (Thangarasa et al., 2023; RepVGG, Ding et al.,
# 2021): here we train a Sparse Parallel MLP on MNIST-1D (per-branch
# BatchNorms, the default) with RigL, fold it into the original dense MLP,
# check that both give the same logits, and time transformed, folded and dense.
# Sparse Wide does not fold (it is a wider network); `sift_jax.compress`
# stores its sparse kernels instead. Finally the folded model is exported with
# `jax.export` and reloaded. Everything runs on CPU in well under a minute.

# %%
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sift_jax
from sift_jax.data import make_dataset
from sift_jax.models import get_model

spec = get_model("mlp_mnist1d", family="sparse_parallel", sparsity=0.75, hidden=(64, 64, 64))
print(f"{spec.name} / {spec.family}: branches {spec.info['branches']}, solved s = {spec.solved_sparsity:.4f}")
test = next(make_dataset("mnist1d", split="test", batch_size=10_000))

# %% [markdown]
# ## Train 600 RigL steps
# The per-branch BatchNorms keep running statistics (`batch_stats`), which the
# fold uses: in inference mode a BatchNorm is an affine map.

# %%
STEPS = 600
tx = sift_jax.rigl(optax.sgd(optax.cosine_decay_schedule(0.1, STEPS), momentum=0.9),
                   sparsity=spec.solved_sparsity, policy=spec.policy, total_steps=STEPS,
                   update_every=100, seed=0)
variables = spec.module.init(jax.random.key(0), jnp.zeros((1,) + spec.input_shape), train=False)
params, batch_stats = variables["params"], variables["batch_stats"]
opt_state = tx.init(params)
params = sift_jax.apply_masks(params, sift_jax.get_masks(opt_state))

@jax.jit
def step(params, batch_stats, opt_state, x, y):
  def loss_fn(p):
    logits, new = spec.module.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), batch_stats, opt_state, loss

data = make_dataset("mnist1d", split="train", batch_size=128, seed=0)
t0 = time.time()
for _ in range(STEPS):
  batch = next(data)
  params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch["image"], batch["label"])
trained = {"params": params, "batch_stats": batch_stats}
logits = spec.module.apply(trained, test["image"], train=False)
print(f"trained in {time.time() - t0:.1f} s; loss {float(loss):.3f}; "
      f"test accuracy {float(jnp.mean(jnp.argmax(logits, -1) == test['label'])):.4f}")

# %% [markdown]
# ## Fold into the dense MLP
# `fold` returns the original architecture (`spec.base_module`, the same model
# with `family="dense"`) and its variables: every branch with its BatchNorm is
# one affine map, and their sum is one kernel and one bias.

# %%
dense_module, dense_vars = sift_jax.fold(spec, trained, sift_jax.get_masks(opt_state))
folded_logits = dense_module.apply(dense_vars, test["image"], train=False)
n_params = lambda v: sum(int(np.size(l)) for l in jax.tree.leaves(v["params"]))
dense_init = dense_module.init(jax.random.key(0), test["image"][:1], train=False)
rel = float(jnp.max(jnp.abs(folded_logits - logits)) / jnp.max(jnp.abs(logits)))
print(f"max relative difference of the logits: {rel:.2e}")
print(f"same predictions: {bool(jnp.all(jnp.argmax(folded_logits, -1) == jnp.argmax(logits, -1)))}")
print(f"parameters: transformed {n_params(trained):,}, folded {n_params(dense_vars):,}, "
      f"dense original {n_params(dense_init):,}")

# %% [markdown]
# ## Latency: transformed, folded, dense original
# Medians of interleaved rounds on this machine's CPU (shared, so noisy); the
# folded model is the dense model with other weights, so it costs the same.

# %%
transformed_fn = jax.jit(lambda v, x: spec.module.apply(v, x, train=False))
dense_fn = jax.jit(lambda v, x: dense_module.apply(v, x, train=False))
variants = {"transformed": (transformed_fn, trained), "folded": (dense_fn, dense_vars),
            "dense original": (dense_fn, dense_init)}

def timed(fn, v, x, calls):
  fn(v, x).block_until_ready()
  t = time.perf_counter()
  for _ in range(calls):
    out = fn(v, x)
  out.block_until_ready()
  return (time.perf_counter() - t) / calls

print(f"{'batch':>6} " + " ".join(f"{k:>16}" for k in variants))
for batch in (1, 128):
  x = test["image"][:batch]
  times = {k: [] for k in variants}
  for _ in range(7):
    for k, (fn, v) in variants.items():
      times[k].append(timed(fn, v, x, 50 if batch == 1 else 10))
  print(f"{batch:>6} " + " ".join(f"{statistics.median(t) * 1e6:13.1f} us" for t in times.values()))

# %% [markdown]
# ## Sparse Wide cannot fold: compress it
# `fold` says why and points to `compress`, which stores each masked kernel in
# a sparse format and runs the model from it (same outputs).

# %%
wide = get_model("mlp_mnist1d", family="sparse_wide", sparsity=0.75, hidden=(64, 64, 64))
wide_vars = wide.init(jax.random.key(1))
wide_masks = sift_jax.init_masks(jax.random.key(2), wide_vars["params"], wide.layer_densities(wide_vars["params"]))
try:
  sift_jax.fold(wide, wide_vars, wide_masks)
except sift_jax.FoldError as e:
  print("FoldError:", e)
small = sift_jax.compress(wide, wide_vars, wide_masks, format="scatter")
masked = dict(wide_vars, params=sift_jax.apply_masks(wide_vars["params"], wide_masks))
want = wide.module.apply(masked, test["image"][:64], train=False)
print("compressed layers:", small.compressed)
print(f"max |difference|: {float(jnp.max(jnp.abs(small(test['image'][:64]) - want))):.2e}")
print(f"bytes: masked dense {sift_jax.inference.variable_bytes(masked):,}, "
      f"compressed {sift_jax.inference.variable_bytes(small.variables):,}")

# %% [markdown]
# ## Export and reload with plain JAX
# `export_model` writes an orbax checkpoint of the folded variables and a
# serialized `jax.export` artifact with a symbolic batch size;
# `python -m sift_jax.export --workdir RUN --out DIR` does the same for a
# finished training run. Reloading needs only `jax` and `orbax`.

# %%
import orbax.checkpoint as ocp

out = os.path.join(tempfile.mkdtemp(), "export")
result = sift_jax.export_model(spec, trained, out, masks=sift_jax.get_masks(opt_state))
print(result.how, sorted(os.listdir(out)))
with open(os.path.join(out, "model.jax_export"), "rb") as f:
  exported = jax.export.deserialize(f.read())
(target, _), _ = jax.tree.unflatten(exported.in_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals])
restored = ocp.StandardCheckpointer().restore(os.path.join(out, "variables"), target)
reloaded = exported.call(restored, test["image"][:100])
print(f"reloaded artifact vs transformed model: max |difference| {float(jnp.max(jnp.abs(reloaded - logits[:100]))):.2e}")
