# %% [markdown]
# # Composing mask transforms on a Flax parameter pytree
#
# `sift_jax` treats sparsity as **pure functions on parameter pytrees**: a policy
# decides which leaves are sparse, `layer_densities` assigns a density per leaf,
# `init_masks` draws exact-count random masks, `apply_masks` zeroes weights and
# `mask_stats` counts. All of them are jittable and work on plain dicts, Linen
# `params` and `nnx.State`. At the end we run one RigL mask update by hand and
# look at what it dropped and grew.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

import sift_jax
from sift_jax import masks as M

print("jax", jax.__version__, "| devices:", jax.devices())

# %% [markdown]
# ## A small Linen model
# A 1-D CNN for MNIST-1D-shaped inputs (length 40): a stem, two conv blocks and
# a classifier head.

# %%
class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x[..., None]
    x = nn.relu(nn.Conv(32, (5,), name="stem")(x))
    x = nn.relu(nn.Conv(64, (3,), strides=2, name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3,), strides=2, name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name="fc")(x))
    return nn.Dense(10, name="head")(x)

model = SmallCNN()
x = jax.random.normal(jax.random.key(0), (64, 40))
y = jnp.arange(64) % 10
params = model.init(jax.random.key(1), x)["params"]
for path, leaf in zip(M.leaf_paths(params), jax.tree.leaves(params)):
  print(f"{path:14s} {str(leaf.shape):16s}")

# %% [markdown]
# ## Policies: which leaves are sparse
# The default selects every leaf with `ndim >= 2`. Models declare dense layers
# (stem, classifier) with regexes on the "/"-joined paths. `explain_selection`
# shows the rule that decided each leaf.

# %%
policy = sift_jax.SparsityPolicy(dense=(r"^stem/", r"^head/"))
for d in sift_jax.explain_selection(params, policy):
  print(f"{d.path:14s} {'sparse' if d.sparse else 'dense':7s} ({d.rule})")

# %% [markdown]
# ## Uniform vs ERK densities
# ERK gives small layers (high `sum(shape)/prod(shape)`) more density while
# keeping the overall count of nonzeros at `(1 - s)` of the sparse leaves.

# %%
s = 0.9
uniform = sift_jax.layer_densities(params, s, policy=policy)
erk = sift_jax.layer_densities(params, s, distribution="erk", policy=policy)
print(f"{'leaf':14s} {'size':>8s} {'uniform':>8s} {'erk':>8s}")
total_u = total_e = total = 0
for path, p, du, de in zip(M.leaf_paths(params), jax.tree.leaves(params),
                           jax.tree.leaves(uniform), jax.tree.leaves(erk)):
  print(f"{path:14s} {p.size:8d} {du:8.4f} {de:8.4f}")
sparse_paths = [d.path for d in sift_jax.explain_selection(params, policy) if d.sparse]
sizes = {pth: p.size for pth, p in zip(M.leaf_paths(params), jax.tree.leaves(params))}
erk_flat = dict(zip(M.leaf_paths(params), jax.tree.leaves(erk)))
budget = sum(erk_flat[p] * sizes[p] for p in sparse_paths) / sum(sizes[p] for p in sparse_paths)
print(f"ERK density over the sparse leaves: {budget:.6f} (target {1 - s:.6f})")
assert abs(budget - (1 - s)) < 1e-9

# %% [markdown]
# ## Exact-count masks, applied
# `init_masks` puts exactly `round(density * size)` ones (half-up, at least 1)
# at random positions; it is jittable and runs under `eval_shape` too.

# %%
masks = jax.jit(lambda k, p: sift_jax.init_masks(k, p, erk))(jax.random.key(2), params)
sparse_params = sift_jax.apply_masks(params, masks)
stats = sift_jax.mask_stats(masks)
for path, row in stats["per_leaf"].items():
  print(f"{path:14s} nnz {int(row['nnz']):7d} / {row['size']:7d}  density {float(row['density']):.4f}")
print(f"total density {float(stats['density']):.4f}")
for p, m in zip(jax.tree.leaves(sparse_params), jax.tree.leaves(masks)):
  assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
abstract = jax.eval_shape(lambda: sift_jax.init_masks(jax.random.key(0), params, erk))
print("abstract mask of conv2:", abstract["conv2"]["kernel"])

# %% [markdown]
# ## Composing transforms
# Masks are ordinary pytrees, so they compose with `jax.tree.map`: here the
# intersection of two random masks and a per-leaf override in the policy.

# %%
other = sift_jax.init_masks(jax.random.key(3), params, sift_jax.layer_densities(params, 0.5, policy=policy))
both = jax.tree.map(jnp.logical_and, masks, other)
print("nnz(masks & other) in fc:", int(sift_jax.mask_stats(both)["per_leaf"]["fc/kernel"]["nnz"]))
pinned = policy.with_densities({r"^fc/": 0.05})
pinned_d = sift_jax.layer_densities(params, 0.9, distribution="erk", policy=pinned)
print("fc density pinned to", pinned_d["fc"]["kernel"], "| conv1 re-solved to", round(pinned_d["conv1"]["kernel"], 4))

# %% [markdown]
# ## One RigL update by hand
# `sift_jax.rigl` is an optax transformation. With `update_every=1` the first
# step is a mask update: drop the smallest `|w|` (30% of the active weights),
# grow where the dense gradient `|g|` is largest. Grown weights start at 0.

# %%
tx = sift_jax.rigl(optax.sgd(0.1), masks=masks, update_every=1, end_step=10, policy=policy)
state = tx.init(params)
params0 = sift_jax.apply_masks(params, masks)

def loss_fn(p):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

grads = jax.grad(loss_fn)(params0)
updates, state = tx.update(grads, state, params0)
params1 = optax.apply_updates(params0, updates)
new_masks = sift_jax.get_masks(state)

print(f"{'leaf':14s} {'active':>7s} {'n_drop':>7s} {'removed':>8s} {'grown':>6s} {'regrown':>8s}")
for path, w, g, m0, m1 in zip(M.leaf_paths(params), jax.tree.leaves(params0), jax.tree.leaves(grads),
                               jax.tree.leaves(masks), jax.tree.leaves(new_masks)):
  m0, m1, w, g = map(np.asarray, (m0, m1, w, g))
  if m0.all():
    continue
  n_active = int(m0.sum())
  n_drop = int(np.floor(np.float32(0.3) * n_active))      # f(0) = f0 = 0.3
  order = np.argsort(-np.where(m0, np.abs(w), -1.0).ravel(), kind="stable")
  survivors = np.zeros(m0.size, bool)
  survivors[order[: n_active - n_drop]] = True             # largest |w| survive the drop
  survivors = survivors.reshape(m0.shape)
  free = ~survivors
  grown = m1 & free                                        # includes dropped-and-regrown
  removed, fresh = m0 & ~m1, m1 & ~m0
  print(f"{path:14s} {n_active:7d} {n_drop:7d} {removed.sum():8d} {fresh.sum():6d} {(grown & m0).sum():8d}")
  assert m1.sum() == n_active                              # exact counts
  assert np.all(m1[survivors])                             # the largest |w| are kept
  assert grown.sum() == n_drop
  assert np.abs(g[grown]).min() >= np.abs(g[free & ~m1]).max()  # grew the largest dense |g|
print("grown weights are zero:", all(np.all(np.asarray(p)[np.asarray(m1) & ~np.asarray(m0)] == 0)
      for p, m0, m1 in zip(jax.tree.leaves(params1), jax.tree.leaves(masks), jax.tree.leaves(new_masks))))
print(sift_jax.sparse_stats(state))
