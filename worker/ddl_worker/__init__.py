"""ddl_worker: the training-script API of ddl-operator jobs (and, in submodules, the pod agent).

    import ddl_worker

    rt = ddl_worker.init()                      # process group from the agent's env
    model = ddl_worker.wrap(net)                # DDP + the job's allreduce, timed
    sampler = ddl_worker.ElasticSampler(len(data), global_batch_size=64)
    resumed = ddl_worker.load_latest()          # on every (re)start
    loop = ddl_worker.steps(1000, start=resumed.step if resumed else 0, state=get_state)
    for step in loop:
        batch = sampler.next_batch()
        ...                                     # forward, loss * batch.weight, backward, step
        loop.record(samples=len(batch.indices), loss=loss.item())

The names load on first use, so the agent (`python -m ddl_worker agent`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddl_worker.checkpoint import Checkpointer, CheckpointError, Loaded
    from ddl_worker.env import EXIT_CODE_PERMANENT, EXIT_CODE_STOPPED, ConfigError
    from ddl_worker.sampler import Batch, ElasticSampler
    from ddl_worker.training import (
        RendezvousError,
        Runtime,
        StepLoop,
        init,
        load_latest,
        runtime,
        save,
        steps,
        wrap,
    )

_HOMES = {
    "CheckpointError": "checkpoint",
    "Checkpointer": "checkpoint",
    "Loaded": "checkpoint",
    "EXIT_CODE_PERMANENT": "env",
    "EXIT_CODE_STOPPED": "env",
    "ConfigError": "env",
    "Batch": "sampler",
    "ElasticSampler": "sampler",
    "RendezvousError": "training",
    "Runtime": "training",
    "StepLoop": "training",
    "init": "training",
    "load_latest": "training",
    "runtime": "training",
    "save": "training",
    "steps": "training",
    "wrap": "training",
}

__all__ = [
    "EXIT_CODE_PERMANENT",
    "EXIT_CODE_STOPPED",
    "Batch",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "ElasticSampler",
    "Loaded",
    "RendezvousError",
    "Runtime",
    "StepLoop",
    "init",
    "load_latest",
    "runtime",
    "save",
    "steps",
    "wrap",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ddl_worker' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ddl_worker.{home}"), name)
