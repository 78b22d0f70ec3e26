# %% [markdown]
# # The Sparse-IFT family
#
# Sparse-IFT replaces each dense layer by a wider (Sparse Wide), parallel
# (Sparse Parallel), factorized (Sparse Factorized) or doped (Sparse Doped)
# structure trained at sparsity `s`, sized so the sparse forward FLOPs equal
# the dense layer's (docs/method.md, section 2). Here we
#
# 1. build a CIFAR ResNet-18 and a small GPT with every member and print the
#    per-layer FLOP tables (counted from the jaxpr),
# 2. check the iso-FLOP guarantee over members and sparsities,
# 3. apply the drop-in transform to a model written in this notebook.
#
# Everything is abstract evaluation (`jax.eval_shape`), so it runs in seconds.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sift_jax
from sift_jax import flops, transformations

print("members:", transformations.MEMBERS if hasattr(transformations, "MEMBERS") else sift_jax.FAMILIES[1:])

# %% [markdown]
# ## The size functions
# From `s` to width factor, branch count and ranks (paper formulas), for a
# 3x3 convolution 64 -> 64.

# %%
for s in (0.5, 0.75, 0.9):
  d = 1 - s
  print(f"s={s}: k_sw={transformations.sparse_wide_factor(s):.3f}  "
        f"branches={transformations.sparse_parallel_branches(s)}  "
        f"factorized rank={transformations.sparse_factorized_rank(9 * 64, 64, s)}  "
        f"doped rank={transformations.sparse_doped_rank(9 * 64, 64, s)}")

# %% [markdown]
# ## CIFAR ResNet-18 under each member
# `get_model` builds the transformed Linen module, its mask policy (stem,
# classifier, norms dense; Doped masks only `S`) and re-solves the sparsity
# after width/rank rounding so the sparse MACs equal the dense model's.

# %%
print(f"{'member':18s} {'s':>5s} {'solved s':>9s} {'params':>12s} {'nonzero':>12s} "
      f"{'dense MACs':>15s} {'sparse MACs':>15s} {'ratio':>8s}")
dense_spec = sift_jax.get_model("resnet18_cifar")
base = flops.model_report(dense_spec)
print(f"{'dense':18s} {0.0:5.2f} {0.0:9.4f} {base.params:12,d} {base.nonzero_params:12,d} "
      f"{base.dense_macs:15,d} {base.sparse_macs:15,.0f} {1.0:8.5f}")
assert base.dense_macs == 555_468_800 and base.params == 11_220_132
ratios = {}
for family in ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"):
  for s in (0.5, 0.75, 0.9):
    spec = sift_jax.get_model("resnet18_cifar", family=family, sparsity=s)
    rep = flops.model_report(spec)
    ratios[family, s] = rep.iso_flop_ratio
    print(f"{family:18s} {s:5.2f} {spec.solved_sparsity:9.4f} {rep.params:12,d} {rep.nonzero_params:12,d} "
          f"{rep.dense_macs:15,d} {rep.sparse_macs:15,.0f} {rep.iso_flop_ratio:8.5f}")
worst = max(abs(r - 1) for r in ratios.values())
print(f"largest deviation from iso-FLOP: {worst:.2e}")
assert worst < 5e-3

# %% [markdown]
# ### The per-layer table of one member
# Sparse Factorized at s = 0.9: each 3x3 conv becomes `U` (3x3, C_in -> r) and
# `V` (1x1, r -> C_out), both sparse.

# %%
spec = sift_jax.get_model("resnet18_cifar", family="sparse_factorized", sparsity=0.9)
print(flops.model_report(spec).format_table())

# %% [markdown]
# ## A small GPT under each member
# The linear layers inside the blocks (QKV, attention output, both MLP layers)
# are transformed; embeddings, layer norms and the LM head stay dense. The
# attention products `QK^T` and `AV` have no weights and count as dense rows.

# %%
for family in ("dense", "sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"):
  spec = sift_jax.get_model("gpt_mini", family=family, sparsity=0.75 if family != "dense" else 0.0)
  rep = flops.model_report(spec)
  print(f"{family:18s} solved s {spec.solved_sparsity:.4f}  params {rep.params:>9,d}  "
        f"sparse MACs {rep.sparse_macs:>14,.0f}  ratio {rep.iso_flop_ratio:.5f}")
print()
print(flops.model_report(sift_jax.get_model("gpt_mini", family="sparse_doped", sparsity=0.75)).format_table())

# %% [markdown]
# ## Training FLOPs of the schedules
# docs/method.md, section 5 (after Evci et al.): dense `3 f_D`; static and SET `3 f_S`;
# RigL `(3 f_S dt + 2 f_S + f_D)/(dt + 1)` inside its update window.

# %%
spec = sift_jax.get_model("resnet18_cifar", family="sparse_wide", sparsity=0.9)
rep = flops.model_report(spec)
steps = 200 * 391  # 200 epochs of CIFAR-100 at batch 128
# The dense baseline is the untransformed ResNet-18; the sparse runs train the
# Sparse Wide model, whose RigL updates need one dense gradient of the wide model.
dense_run = flops.training_flops(base.dense_macs, base.dense_macs, method="dense", total_steps=steps,
                                 batch_size=128)
print(f"dense ResNet-18     training FLOPs per run: {dense_run.total:.4e}")
for method in ("static", "set", "rigl"):
  tf = flops.training_flops(rep.sparse_macs, rep.dense_macs, method=method, total_steps=steps, batch_size=128)
  print(f"Sparse Wide {method:7s} training FLOPs per run: {tf.total:.4e}  ({tf.total / dense_run.total:.3f} x dense)")

# %% [markdown]
# ## The drop-in transform on a model written here
# `sift_jax.transform` intercepts the `nn.Dense` / `nn.Conv` / `nn.DenseGeneral`
# layers of any Linen model, without editing its code. We keep the input
# layer and the classifier dense with a policy, then solve the sparsity so
# the sparse MACs equal the original model's.

# %%
class MyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)

x = jnp.zeros((1, 40))
policy = sift_jax.SparsityPolicy(dense=("^Dense_0/", "^Dense_3/"))
base_macs = flops.count_macs(MyNet(), jax.eval_shape(lambda: MyNet().init(jax.random.key(0), x)), x).total
for family in ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"):
  model = sift_jax.transform(MyNet(), family=family, sparsity=0.75, policy=policy)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  sol = model.solve(x)
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  names = sorted({"/".join(p.split("/")[:-1]) for p in sift_jax.masks.leaf_paths(variables["params"])})
  print(f"{family:18s} solved s {sol.solved_sparsity:.4f} ratio {sol.iso_flop_ratio:.5f} out {out.shape}  layers {names}")
  assert out.shape == (1, 10)
  assert abs(sol.iso_flop_ratio - 1) < 5e-3
print("dense MACs of MyNet:", base_macs)
