"""The drop-in matrix: seven model shapes x the four Sparse-IFT members x s in {0.5, 0.9}.

Every cell checks, through ``sift_jax.transform`` with no layer named: the model builds, its
output shape is the dense model's, the sparse MACs (the masks RigL holds after an update) are
within 0.5% of the dense model's, after two RigL steps (a mask update at step 1) every masked
weight is exactly 0.0 and every mask keeps its count, and only kernels carry a mask (no bias,
norm scale, embedding or position parameter). Models are tiny (D=32, one or two blocks, 4 tokens,
batch 2); the dense MAC count and output shape are computed once per model.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import flops, models
from sift_jax.masks import tree_paths

D, HEADS, TOKENS, VOCAB = 32, 2, 4, 12
MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
SPARSITIES = (0.5, 0.9)
# XLA's cheap optimisation level: each cell compiles its own step and runs it twice.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Block(nn.Module):
  """Pre-LN block: Flax attention and an MLP, both residual."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn")(h, h)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(2 * D, name="fc1")(h)))


class ScanBlock(nn.Module):
  """``Block`` with the (carry, per-step input) signature of ``nn.scan``."""

  @nn.compact
  def __call__(self, x, _):
    return Block(name="block")(x), None


class ScannedStack(nn.Module):
  """Embedding Dense, two blocks stacked by ``nn.scan`` (stacked params), a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    blocks = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


class RematStack(nn.Module):
  """The same stack with a rematerialised (``nn.remat``) block; one block, since remat
  doubles the traced forward pass (the cost of Sparse Parallel's ten branches at s = 0.9)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    for i in range(1):
      x = nn.remat(Block)(name=f"block_{i}")(x)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


class SetupMLP(nn.Module):
  """Layers defined in ``setup()`` (attributes and a list), not inline."""

  def setup(self):
    self.stem = nn.Dense(D)
    self.hidden = [nn.Dense(2 * D), nn.Dense(D)]
    self.norm = nn.LayerNorm()
    self.head = nn.Dense(3)

  def __call__(self, x):
    x = nn.relu(self.stem(x))
    h = nn.relu(self.hidden[0](self.norm(x)))
    return self.head(x + self.hidden[1](h))


class SharedLayer(nn.Module):
  """One Dense applied twice (shared weights) between a stem and a head."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(D, name="shared")
    h = nn.relu(nn.Dense(D, name="stem")(x))
    return nn.Dense(3, name="head")(shared(nn.relu(shared(h))))


class NnxMLP(nnx.Module):
  """An NNX MLP with a LayerNorm."""

  def __init__(self, *, rngs):
    self.stem = nnx.Linear(8, D, rngs=rngs)
    self.fc = nnx.Linear(D, 2 * D, rngs=rngs)
    self.norm = nnx.LayerNorm(2 * D, rngs=rngs)
    self.head = nnx.Linear(2 * D, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    return self.head(nnx.relu(self.norm(self.fc(x))))


def _vit():
  return models.ViT(num_classes=3, patch_size=2, width=D, depth=1, num_heads=HEADS,
                    mlp_width=2 * D)


def _bert():
  return models.BERT(vocab_size=VOCAB, context=TOKENS, width=D, depth=1, num_heads=HEADS,
                     mlp_width=2 * D, dropout_rate=0.0)


_SEQ = jax.random.normal(jax.random.key(2), (2, TOKENS, 8))
# name -> (model factory, batch-2 input)
MODELS = {
    "vit": (_vit, jax.random.normal(jax.random.key(0), (2, 4, 4, 1))),  # 4 patches + class token
    "bert": (_bert, jax.random.randint(jax.random.key(1), (2, TOKENS), 0, VOCAB)),
    "scanned": (ScannedStack, _SEQ),
    "remat": (RematStack, _SEQ),
    "setup": (SetupMLP, jax.random.normal(jax.random.key(3), (2, 8))),
    "shared": (SharedLayer, jax.random.normal(jax.random.key(4), (2, 8))),
    "nnx_mlp": (lambda: NnxMLP(rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(5), (2, 8))),
}


def _random_init(module, x, seed=0):
  """Variables with numpy random values: no XLA compile of the initialisers."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract)


@pytest.fixture(scope="module")
def dense_reference():
  """Per model (computed on first use): the dense MACs at batch 1 and the output shape."""
  cache = {}

  def get(name):
    if name not in cache:
      make, x = MODELS[name]
      model = make()
      if isinstance(model, nnx.Module):
        macs, shape = flops.count_macs(model, x[:1]).total, model(x).shape
      else:
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        macs = flops.count_macs(model, variables, x[:1]).total
        shape = jax.eval_shape(model.apply, variables, x).shape
      cache[name] = (macs, shape)
    return cache[name]

  return get


def _loss(out, x):
  target = jnp.linspace(-1.0, 1.0, out.size, dtype=out.dtype).reshape(out.shape)
  return jnp.mean((out - target) ** 2)


def _rigl(policy, params, sparsity):
  densities = sift_jax.layer_densities(params, sparsity, policy=policy)
  # Two steps: step 0 ordinary, step 1 a mask update (drop half, grow as many).
  return sift_jax.rigl(optax.sgd(0.1), densities=densities, policy=policy, update_every=1,
                       start_step=1, end_step=2, drop_fraction=0.5, drop_schedule="constant",
                       seed=1)


def _linen_parts(sift, x):
  """Random variables (numpy: no initialiser compile), ``apply(params, extra, x)``, MACs."""
  v = _random_init(sift, x)
  extra = {k: c for k, c in v.items() if k != "params"}
  apply = lambda p, extra, x: sift.apply({"params": p, **extra}, x)
  macs = flops.count_macs(sift, v, x[:1])
  return v["params"], extra, apply, sift.sparsity_policy(x[:1]), macs


def _nnx_parts(model, x):
  """The NNX model after ``lazy_init``, split into its parameters (a plain dict) and the rest."""
  model.lazy_init(x)
  graphdef, param_state, extra = nnx.split(model, nnx.Param, ...)

  def apply(p, extra, x):
    # Fresh Variables at the caller's trace level: calling the module advances its RNG count.
    state, extra = jax.tree.map(lambda a: a, (param_state, extra))
    nnx.replace_by_pure_dict(state, p)
    return nnx.merge(graphdef, state, extra)(x)

  macs = flops.count_macs(model, x[:1])
  return nnx.to_pure_dict(param_state), extra, apply, model.sparsity_policy(), macs


def _train(params, extra, apply, policy, x, sparsity):
  """RigL init and two steps (step 0 ordinary, step 1 a mask update), compiled once."""
  tx = _rigl(policy, params, sparsity)

  def run(params, extra):
    state = tx.init(params)
    masks0 = sift_jax.get_masks(state)
    params = sift_jax.apply_masks(params, masks0)

    def step(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: _loss(apply(p, extra, x), x))(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), None, length=2)
    return params, masks0, state, apply(params, extra, x)

  # Cheap XLA passes: the cell runs its executable once.
  return jax.jit(run).lower(params, extra).compile(FAST_COMPILE)(params, extra)


def _flat(tree):
  return dict(zip(tree_paths.leaf_paths(tree), map(np.asarray, jax.tree.leaves(tree))))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("family", MEMBERS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dropin_cell(name, family, sparsity, dense_reference):
  base_macs, out_shape = dense_reference(name)
  make, x = MODELS[name]
  model = make()
  sift = sift_jax.transform(model, family=family, sparsity=sparsity)
  solution = sift.solve(x[:1])
  assert solution.base_dense_macs == base_macs
  parts = (_nnx_parts if isinstance(model, nnx.Module) else _linen_parts)(sift, x)
  params, extra, apply, policy, macs = parts
  params, masks0, opt_state, out = _train(params, extra, apply, policy, x, solution.solved_sparsity)
  # Builds, and the output shape is the dense model's.
  assert out.shape == out_shape
  assert np.all(np.isfinite(np.asarray(out)))
  masks = sift_jax.get_masks(opt_state)
  # A mask update happened at step 1 and changed the masks, keeping every count.
  assert int(sift_jax.sparse_stats(opt_state)["num_updates"]) == 1
  flat_params, flat_masks, flat_masks0 = _flat(params), _flat(masks), _flat(masks0)
  assert set(flat_masks) == set(flat_params)
  assert sum(int(np.sum(flat_masks0[p] & ~flat_masks[p])) for p in flat_masks) > 0
  for path, mask in flat_masks.items():
    assert int(mask.sum()) == int(flat_masks0[path].sum()), path
    # Every masked weight is exactly zero after the update.
    assert np.all(flat_params[path][~mask] == 0.0), path
  # Only kernels are masked: no bias, norm scale, embedding or position parameter.
  sparse = {d.path for d in sift_jax.explain_selection(params, policy) if d.sparse}
  masked = {p for p, m in flat_masks.items() if not m.all()}
  assert masked == sparse
  assert all(p.rsplit("/", 1)[-1] == "kernel" for p in sparse), sorted(sparse)
  # Iso-FLOP: the MACs of the masks RigL holds now, against the dense model's.
  report = flops.flops_report(macs, params, masks=masks, base_dense_macs=base_macs)
  assert abs(report.sparse_macs / base_macs - 1.0) <= 0.005, (report.sparse_macs, base_macs)
