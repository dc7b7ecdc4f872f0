"""Resume: the ServerApp's per-round checkpoint, from which a killed run continues.

Flower keeps no server state across a restart: a killed ServerApp (or SuperLink) loses the
global model, the round number and the server optimiser. After every round the ServerApp writes
`checkpoints/server.pt` atomically (whole or not at all) in the run folder:

- `round`: the last completed round; `arrays`: the global model exactly as aggregated (dtypes
  kept, e.g. FedAdam's float64), what the next round sends to the sites;
- `strategy_state`: the server optimiser's state by attribute name, read from the base Flower
  strategy that `FedSSLStrategy` aggregates with (`SERVER_OPTIMIZER_STATE`: FedAdam/FedYogi's
  moments `m_t`/`v_t`, FedAvgM's `momentum_vector`);
- `random_state`: Python's `random` state, with which the strategies sample the round's nodes;
- `epsilon`: each DP site's epsilon as last reported; `strategy`, to refuse another scenario's;
- `format`: `CHECKPOINT_FORMAT`. Checkpoints without it (older fedssl keyed the optimiser state by
  the wrappers' nesting depth, `"1.m_t"`) are refused: restoring them by guess could be silently wrong.

A run started with run config `resume = true` loads it and runs the remaining rounds, numbered on
from the checkpoint's round (`FedSSLStrategy.done`), so the round numbers the sites see continue
(they seed their local training and plan their DP-SGD noise by the server round). Without a
checkpoint it starts at round 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from fedssl.runfolder import RunFolder
from fedssl.storage import atomic_torch_save

# attributes of flwr.serverapp.strategy objects that carry state from one round to the next
# (FedOpt's and FedAvgM's `current_arrays` is the global model itself, set again in configure_train)
SERVER_OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")
# 2: `strategy_state` by attribute name of the base strategy (1, unnumbered: by wrapper depth, "1.m_t")
CHECKPOINT_FORMAT = 2


class CheckpointMismatch(ValueError):
    """The run folder's checkpoint belongs to another configuration than the scenario's, or to
    another fedssl version (a ValueError: the command line reports it as one line)."""


@dataclass
class ServerCheckpoint:
    """What the ServerApp needs to continue a run after `round` (see the module docstring)."""

    round: int
    strategy: str
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, dict | list] = field(default_factory=dict)
    random_state: tuple | None = None
    epsilon: dict[str, float] = field(default_factory=dict)

    def array_record(self) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in self.arrays.items()})

    def save(self, run_dir: Path) -> Path:
        """Write the checkpoint atomically (numpy arrays as tensors: loadable with weights_only)."""
        state = {k: _tensors(v) for k, v in self.strategy_state.items()}
        return atomic_torch_save({"format": CHECKPOINT_FORMAT, "round": self.round, "strategy": self.strategy,
                                  "arrays": _tensors(self.arrays), "strategy_state": state,
                                  "random_state": self.random_state, "epsilon": dict(self.epsilon)},
                                 RunFolder(run_dir).server_checkpoint)

    @classmethod
    def load(cls, run_dir: Path) -> ServerCheckpoint | None:
        """The run folder's checkpoint, or None if no round has completed there; refused if it
        was written in another format than `CHECKPOINT_FORMAT`."""
        path = RunFolder(run_dir).server_checkpoint
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        written = saved.get("format", 1)
        if written != CHECKPOINT_FORMAT:
            version = "an older" if written < CHECKPOINT_FORMAT else "a newer"
            raise CheckpointMismatch(f"{path} was written by {version} fedssl (checkpoint format {written}, this "
                                     f"one reads format {CHECKPOINT_FORMAT}); start the run afresh (without "
                                     "resume) or resume it with the fedssl version that wrote it")
        return cls(round=saved["round"], strategy=saved["strategy"],
                   arrays=_arrays(saved["arrays"]),
                   strategy_state={k: _arrays(v) for k, v in saved["strategy_state"].items()},
                   random_state=saved["random_state"], epsilon=saved["epsilon"])

    def check(self, strategy: str, rounds: int, reference: dict[str, torch.Tensor]) -> None:
        """Refuse a checkpoint that does not fit the scenario (another strategy or model)."""
        if self.strategy != strategy:
            raise CheckpointMismatch(f"the checkpoint was written by strategy {self.strategy}, the scenario "
                                     f"uses {strategy}; resume with the same scenario or start a new run")
        if self.round > rounds:
            raise CheckpointMismatch(f"the checkpoint is of round {self.round}, past the scenario's {rounds} rounds")
        shapes = {k: tuple(v.shape) for k, v in self.arrays.items()}
        if shapes != {k: tuple(v.shape) for k, v in reference.items()}:
            raise CheckpointMismatch("the checkpoint's global model does not match the scenario's model")

    def restore(self, base: Strategy) -> None:
        """Put the server optimiser's state back on `base`, a freshly built base strategy of the
        same kind, and the node sampling's state back on `random`."""
        restore_optimizer_state(base, self.strategy_state)
        random.setstate(self.random_state)


def resume_point(run_dir: Path, strategy: str, rounds: int, reference: dict[str, torch.Tensor]
                 ) -> ServerCheckpoint | None:
    """The checkpoint a resumed run continues from (checked against the scenario), None to start afresh."""
    checkpoint = ServerCheckpoint.load(run_dir)
    if checkpoint is None:
        log(INFO, "fedssl | resume: no checkpoint in %s yet, starting at round 1", run_dir)
        return None
    checkpoint.check(strategy, rounds, reference)
    log(INFO, "fedssl | resuming after round %d of %d from %s (server optimiser state: %s; epsilon: %s)",
        checkpoint.round, rounds, RunFolder(run_dir).server_checkpoint, ", ".join(checkpoint.strategy_state) or "none",
        checkpoint.epsilon or "-")
    return checkpoint


def _tensors(value):
    """numpy arrays (in dicts / lists) as torch tensors of the same dtype."""
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()}
    return [torch.from_numpy(np.ascontiguousarray(v)) for v in value]


def _arrays(value):
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


def optimizer_state(base: Strategy) -> dict[str, dict | list]:
    """The base strategy's server optimiser state by attribute name (empty for FedAvg & co)."""
    return {name: value for name in SERVER_OPTIMIZER_STATE if (value := getattr(base, name, None)) is not None}


def restore_optimizer_state(base: Strategy, state: dict[str, dict | list]) -> None:
    """Put `optimizer_state`'s output back on a freshly built base strategy of the same kind."""
    for name, value in state.items():
        if name not in SERVER_OPTIMIZER_STATE or not hasattr(base, name):
            raise CheckpointMismatch(f"the checkpoint holds the server optimiser state {name!r}, which the "
                                     f"scenario's {type(base).__name__} does not keep")
        setattr(base, name, value)
