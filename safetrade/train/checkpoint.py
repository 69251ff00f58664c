"""Orbax checkpoints of the train state: atomic saves, keep-N, resume, and a fallback past a damaged step.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous step intact. If the newest step is unreadable anyway (truncated by a full disk, edited by hand),
`restore_latest` says so loudly and restores the newest readable one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from safetrade.errors import SafetradeError

log = logging.getLogger(__name__)


class CheckpointRestoreError(SafetradeError):
    pass


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_state):
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as err:  # orbax raises many types for damaged files; report which step and why
            raise CheckpointRestoreError(
                f"{self.directory / str(step)}: cannot restore checkpoint ({type(err).__name__}: {err})"
            ) from err

    def restore_latest(self, abstract_state):
        """(step, state) of the newest readable checkpoint, or (None, None) when there is none."""
        failures = []
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract_state)
            except CheckpointRestoreError as err:
                log.error("%s; trying an older checkpoint", err)
                failures.append(str(err))
        if failures:
            raise CheckpointRestoreError("no readable checkpoint: " + "; ".join(failures))
        return None, None

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete tree, as orbax restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
