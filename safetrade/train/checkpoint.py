"""Orbax checkpoints of the train state: atomic background saves, keep-N, resume, a fallback past a damaged step.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous step intact. If the newest step is unreadable anyway (truncated by a full disk, edited by hand),
`restore_latest` says so loudly and restores the newest readable one.

Saves are asynchronous: `save` returns once the state has been copied off the device (orbax's default
synchronous device -> host transfer, so the caller may donate or overwrite the state right away) and the files are
written by a background thread while training goes on. Every other method (the next save, `steps`, `restore`,
`close`) first waits for that write to finish, so none of them sees a half-written step.
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
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def save(self, step: int, state) -> None:
        """Start saving `state` as `step`; returns when it is on the host, before the files are written."""
        self.manager.wait_until_finished()  # one write in flight at a time: its step is final before the next
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete on disk."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.wait()
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_state):
        self.wait()
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
        self.manager.close()  # waits for a write in flight, then stops orbax's background threads


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete tree, as orbax restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
