"""Sharded training of Sparse-IFT models: config, optimizers, steps, checkpoints, loop, sweeps."""

from sift_jax.training.checkpointing import (Checkpointer, IncompatibleCheckpointError, VerifiedCheckpointer,
                                             state_checksums, state_fingerprint)
from sift_jax.training.config import (COMPUTE_DTYPES, OPTIMIZERS, SCHEDULES, SPARSE_METHODS,
                                      apply_overrides, default_config, flatten_config, validate_config)
from sift_jax.training.loop import (NonFiniteLossError, RunFunctions, build_run, clear_compilation_cache,
                                    evaluate, train_and_evaluate)
from sift_jax.training.metrics import MetricsWriter, TrainWindow, read_metrics
from sift_jax.training.optimizers import (is_sparse_run, make_inner_optimizer, make_optimizer,
                                          make_schedule, weight_decay_mask)
from sift_jax.training.state import TrainState, make_init_fn
from sift_jax.training.step import (TASKS, MaskedTokens, Task, cross_entropy, get_task,
                                    make_eval_step, make_train_step, mask_tokens)
from sift_jax.training.sweep import SweepRun, aggregate, family_grid, format_table, run_sweep
from sift_jax.training.workdir import WorkdirLock, WorkdirLockedError

__all__ = [
    "COMPUTE_DTYPES", "Checkpointer", "IncompatibleCheckpointError", "MetricsWriter",
    "NonFiniteLossError", "OPTIMIZERS", "RunFunctions", "SCHEDULES", "SPARSE_METHODS", "TrainState",
    "apply_overrides", "build_run", "clear_compilation_cache", "cross_entropy", "default_config",
    "evaluate", "flatten_config", "is_sparse_run", "make_eval_step", "make_inner_optimizer",
    "make_init_fn", "make_optimizer", "make_schedule", "make_train_step", "read_metrics",
    "state_fingerprint", "train_and_evaluate", "validate_config", "weight_decay_mask",
    "SweepRun", "aggregate", "family_grid", "format_table", "run_sweep",
    "TrainWindow", "VerifiedCheckpointer", "WorkdirLock", "WorkdirLockedError", "state_checksums",
    "TASKS", "MaskedTokens", "Task", "get_task", "mask_tokens",
]
