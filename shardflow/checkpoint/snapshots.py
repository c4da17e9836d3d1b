"""``save`` / ``wait_save`` for anything that can name its state: compiled plans and pipelines alike.

A class provides ``_named_state()`` (tensors by checkpoint name, JSON-able meta); this mixin writes it
atomically, in the foreground or in the background, one save in flight at a time.
"""

from __future__ import annotations

from typing import Any

from shardflow.checkpoint.store import AsyncSave
from shardflow.checkpoint.store import save as save_checkpoint
from shardflow.tensor.global_tensor import GlobalTensor


class Snapshots:
    saving: AsyncSave | None = None

    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        raise NotImplementedError

    def save(self, directory: str, blocking: bool = True) -> None:
        """Snapshot the state (collective; atomic: a crash leaves the previous snapshot whole).

        ``blocking=False`` copies this rank's shards to host memory and writes them in the background while
        training goes on; the snapshot is the state at the call. Saves complete in order: the next ``save``,
        ``load`` or ``wait_save()`` waits for the one in flight and raises its error, if any.
        """
        self.wait_save()
        tensors, meta = self._named_state()
        if blocking:
            save_checkpoint(directory, tensors, meta)
        else:
            self.saving = AsyncSave(directory, tensors, meta)

    def wait_save(self) -> None:
        """Wait for a background save to complete (call it before the job ends)."""
        saving, self.saving = self.saving, None
        if saving is not None:
            saving.wait()
