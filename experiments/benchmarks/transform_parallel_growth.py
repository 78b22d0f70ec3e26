"""transform()ed Sparse Parallel MLP (LayerNorm per branch) on digits, s = 0.9, RigL: dense vs
per-tensor growth vs sibling growth (sift_jax.optim.branch_growth); accuracy and branch-mask
overlap over chance. Run: PYTHONPATH=. python experiments/benchmarks/transform_parallel_growth.py
(about 6 minutes on 2 busy CPU cores)."""
import time
import numpy as np, jax, optax, flax.linen as nn
import sift_jax
from sift_jax.data import offline
from sift_jax.transformations import branch_mask_overlap

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="stem")(x))
    x = nn.relu(nn.Dense(32, name="fc_0")(x))
    x = nn.relu(nn.Dense(32, name="fc_1")(x))
    return nn.Dense(10, name="head")(x)

tr, te = offline.load_digits_arrays("train"), offline.load_digits_arrays("test")
xtr, ytr = np.asarray(tr.images).reshape(-1, 64), np.asarray(tr.labels)
xte, yte = np.asarray(te.images).reshape(-1, 64), np.asarray(te.labels)
policy = sift_jax.SparsityPolicy(dense=("stem", "head"))

def run(family, gg, steps=300, seed=11):
  model = MLP() if family == "dense" else sift_jax.transform(MLP(), family=family, sparsity=0.9, policy=policy)
  params = model.init(jax.random.key(seed), xtr[:1])["params"]
  inner = optax.sgd(0.1, momentum=0.9)
  if family == "dense":
    tx = inner
  else:
    sol = model.solve(xtr[:1])
    tx = sift_jax.rigl(inner, sparsity=sol.solved_sparsity, policy=model.sparsity_policy(),
                       total_steps=steps, update_every=25, grow_groups=gg, seed=seed)
  opt = tx.init(params)
  if family != "dense":
    params = sift_jax.apply_masks(params, sift_jax.get_masks(opt))
  @jax.jit
  def step(p, o, x, y):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean())(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    i = rng.integers(0, len(xtr), 128)
    params, opt = step(params, opt, xtr[i], ytr[i])
  acc = float(np.mean(np.argmax(model.apply({"params": params}, xte), -1) == yte))
  ov = {} if family == "dense" else {k: (round(v.ratio, 2), v.all_active) for k, v in branch_mask_overlap(jax.device_get(sift_jax.get_masks(opt))).items()}
  return acc, ov

for fam, gg, name in (("dense", None, "dense"), ("sparse_parallel", None, "independent"), ("sparse_parallel", sift_jax.parallel_branch_groups, "exclusive")):
  for seed in (11, 22):
    t = time.time(); acc, ov = run(fam, gg, seed=seed); print(name, seed, acc, ov, round(time.time() - t, 1), flush=True)
