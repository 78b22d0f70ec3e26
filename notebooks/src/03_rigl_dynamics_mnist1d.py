# %% [markdown]
# # RigL dynamics on MNIST-1D
#
# We train the Sparse Wide MLP for MNIST-1D (s = 0.75, iso-FLOP with the dense
# MLP) with three mask schedules, static, SET and RigL, and follow:
#
# * the number of connections dropped and grown at each mask update,
# * the fraction of weights that were ever active (in-time over-parameterisation),
# * the spectral metrics of the masks (Ramanujan gap, weighted spectral gap,
#   docs/method.md, section 7) against test accuracy.
#
# Everything runs on CPU in one to two minutes; the data are generated offline
# by the `mnist1d` package.

# %%
import io
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use("Agg")  # figures are rendered to PNG and displayed explicitly
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Image, display

import sift_jax
from sift_jax import spectral
from sift_jax.data import make_dataset
from sift_jax.models import get_model

def show(fig):
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(data=buf.getvalue()))

spec = get_model("mlp_mnist1d", family="sparse_wide", sparsity=0.75)
print(f"{spec.name} / {spec.family}: nominal s = {spec.nominal_sparsity}, solved s = {spec.solved_sparsity:.4f}")
test = next(make_dataset("mnist1d", split="test", batch_size=10_000))
print("test set:", test["image"].shape, test["label"].shape)

# %% [markdown]
# ## One jitted step for all three methods
# The mask update is inside the optax transformation (a `lax.cond` on the step
# counter), so ordinary and update steps share one compiled function.

# %%
# SIFT_JAX_NOTEBOOK_QUICK=1 (set by the test suite) runs every cell on a fifth of the steps.
QUICK = os.environ.get("SIFT_JAX_NOTEBOOK_QUICK") == "1"
TOTAL_STEPS, UPDATE_EVERY, SPECTRAL_EVERY = (300, 20, 100) if QUICK else (1500, 100, 300)
BATCH = 128

def make_tx(method, seed):
  inner = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(optax.cosine_decay_schedule(0.05, TOTAL_STEPS), momentum=0.9))
  common = dict(sparsity=spec.solved_sparsity, policy=spec.policy, seed=seed)
  if method == "static":
    return sift_jax.static_sparse(inner, **common)
  factory = sift_jax.rigl if method == "rigl" else sift_jax.set_sparse
  return factory(inner, total_steps=TOTAL_STEPS, update_every=UPDATE_EVERY, **common)

def train(method, seed=0, log_every=UPDATE_EVERY, spectral_every=SPECTRAL_EVERY):
  tx = make_tx(method, seed)
  params = spec.module.init(jax.random.key(seed), jnp.zeros((1,) + spec.input_shape), train=False)["params"]
  opt_state = tx.init(params)
  params = sift_jax.apply_masks(params, sift_jax.get_masks(opt_state))

  def loss_fn(p, x, y):
    logits = spec.module.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def accuracy(p):
    logits = spec.module.apply({"params": p}, test["image"], train=False)
    return jnp.mean(jnp.argmax(logits, -1) == test["label"])

  data = make_dataset("mnist1d", split="train", batch_size=BATCH, seed=seed)
  log = {"step": [], "dropped": [], "grown": [], "ever_active": [], "accuracy": []}
  # Step 0: the initial random masks, the common starting point of all methods.
  spec_log = [{"step": 0, **spectral.model_metrics(params, sift_jax.get_masks(opt_state))["summary"]}]
  for t in range(TOTAL_STEPS):
    batch = next(data)
    params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
    if (t + 1) % log_every == 0:
      st = sift_jax.sparse_stats(opt_state)
      log["step"].append(t + 1)
      log["dropped"].append(int(st["num_dropped"]))
      log["grown"].append(int(st["num_grown"]))
      log["ever_active"].append(float(st["ever_active_fraction"]))
      log["accuracy"].append(float(accuracy(params)))
    if (t + 1) % spectral_every == 0:
      summary = spectral.model_metrics(params, sift_jax.get_masks(opt_state))["summary"]
      spec_log.append({"step": t + 1, **summary})
  assert step._cache_size() == 1
  return params, opt_state, log, spec_log

runs = {}
for method in ("static", "set", "rigl"):
  t0 = time.time()
  runs[method] = train(method)
  print(f"{method:6s}: test accuracy {runs[method][2]['accuracy'][-1]:.4f}, "
        f"ever-active {runs[method][2]['ever_active'][-1]:.3f}, {time.time() - t0:.1f} s")

# %% [markdown]
# ## Drop and grow counts, ever-active fraction
# The drop fraction decays with a cosine from 0.3 to 0 at 75% of training;
# `num_dropped`/`num_grown` count connections that actually changed (a dropped
# weight that RigL immediately regrows keeps its value and is not counted).

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for method, (_, _, log, _) in runs.items():
  axes[0].plot(log["step"], log["grown"], label=method)
  axes[1].plot(log["step"], log["ever_active"], label=method)
  axes[2].plot(log["step"], log["accuracy"], label=method)
axes[0].set_title("connections grown at the last update"); axes[0].set_xlabel("step")
axes[1].set_title("fraction of weights ever active"); axes[1].set_xlabel("step")
axes[2].set_title("test accuracy"); axes[2].set_xlabel("step")
for ax in axes:
  ax.legend()
fig.tight_layout()
show(fig)
for method, (_, st, log, _) in runs.items():
  print(f"{method:6s} mask updates {int(st.stats.num_updates):3d}, first/last grown {log['grown'][0]}/{log['grown'][-1]}")
assert int(runs["static"][1].stats.num_updates) == 0
assert int(runs["rigl"][1].stats.num_updates) == len(range(0, int(0.75 * TOTAL_STEPS), UPDATE_EVERY))
assert runs["rigl"][2]["ever_active"][-1] > runs["static"][2]["ever_active"][-1]

# %% [markdown]
# ## Spectral view of the masks
# Each masked layer is a bipartite graph. `spectral.model_metrics` computes the
# Ramanujan gap (topology) and the weighted spectral gap (magnitudes) per layer;
# we follow their layer means through training.

# %%
for method, (_, _, _, spec_log) in runs.items():
  first, last = spec_log[0], spec_log[-1]
  print(f"{method:6s} Ramanujan gap {first['ramanujan_gap']:.3f} (step 0) -> {last['ramanujan_gap']:.3f} "
        f"(step {last['step']}), weighted spectral gap {first['weighted_spectral_gap']:.3f} -> "
        f"{last['weighted_spectral_gap']:.3f}")
# Same seed, same initial masks: all three methods start from one point.
assert len({round(r[3][0]["ramanujan_gap"], 9) for r in runs.values()}) == 1
path = "rigl_spectral_trajectory.png"
spectral.trajectory_plot({m: r[3] for m, r in runs.items()}, path)
display(Image(filename=path))

# %% [markdown]
# ## Spectral metrics against accuracy
# More runs (a second seed of each method) to see whether the final spectral
# metrics line up with final accuracy.

# %%
points = []
for method in ("static", "set", "rigl"):
  for seed in (1,):
    _, _, log, spec_log = train(method, seed=seed, log_every=TOTAL_STEPS, spectral_every=TOTAL_STEPS)
    points.append((method, log["accuracy"][-1], spec_log[-1]["ramanujan_gap"], spec_log[-1]["weighted_spectral_gap"]))
points += [(m, r[2]["accuracy"][-1], r[3][-1]["ramanujan_gap"], r[3][-1]["weighted_spectral_gap"]) for m, r in runs.items()]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for method, color in zip(("static", "set", "rigl"), ("C0", "C1", "C2")):
  pts = [p for p in points if p[0] == method]
  axes[0].scatter([p[2] for p in pts], [p[1] for p in pts], c=color, label=method)
  axes[1].scatter([p[3] for p in pts], [p[1] for p in pts], c=color, label=method)
axes[0].set_xlabel("Ramanujan gap (layer mean)"); axes[0].set_ylabel("test accuracy")
axes[1].set_xlabel("weighted spectral gap (layer mean)"); axes[1].set_ylabel("test accuracy")
axes[0].legend(); fig.tight_layout(); show(fig)
acc = np.array([p[1] for p in points]); wgap = np.array([p[3] for p in points])
print(f"{len(points)} runs; Pearson r(accuracy, weighted spectral gap) = {np.corrcoef(acc, wgap)[0, 1]:.3f}")
