"""Crash-safe checkpoint files for Lightning: every checkpoint the Trainer writes (ModelCheckpoint's step files and
``last.ckpt``) goes through ``ddim.checkpoints.save_atomically`` (``ddim.files.write_atomically``: temporary file in
the target directory, fsync, ``os.replace``, directory fsync), so a kill at any moment leaves the previous file
loadable, wherever ``$TMPDIR`` is.  Lightning's own writer stages the file in ``$TMPDIR`` and moves it, which is
a copy over the old file when ``$TMPDIR`` is another file system."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddim.checkpoints import save_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (``save_atomically``); remote paths (s3://, ...) keep
    Lightning's writer.  train.py sets it on every Trainer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, str(path).removeprefix("file://"))
