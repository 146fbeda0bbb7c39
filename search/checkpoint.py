"""Per-trial checkpoints on a (possibly shared) filesystem, owned by one study and retry chain.

A study's checkpoints live in `DIR/<study name>-<uuid prefix>/`: the uuid is stored on the
study when it is created (`search.record.STUDY_UUID`), so a new study that reuses a name (a new
database, `rm search.db`) never finds the old one's files. A checkpoint is keyed by its retry
chain's *root* trial number: a retried trial (same parameters, new number) finds the checkpoint
of the trial it replaces and resumes from its last epoch. Each file also records its owner
(study uuid and chain root) and is loaded only by that owner; a foreign file is logged and
ignored. Files are loaded with `torch.load(weights_only=True)`: tensors, state dicts, a
Generator state and plain Python values only, so a file planted in the folder cannot run code.

When a trial ends its checkpoint is removed (`Checkpoints.finished`); with
`workers.keep_checkpoints: best` the best-epoch weights of a completed trial are kept as
`trial-<root>.best.pt`. User objectives get checkpoints by accepting a `checkpoint` keyword::

    def train(params, device, report, checkpoint=None):
        state = checkpoint.load() if checkpoint else None   # dict or None
        ...
        checkpoint.save({"epoch": epoch, "model": model.state_dict()})
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from search.exceptions import CheckpointError, DiskFullError

logger = logging.getLogger(__name__)

#: The key of the owner record in a saved file; the objective's state is under `_STATE`.
_OWNER = "search_checkpoint_owner"
_STATE = "state"
#: Temp files of saves older than this are left over by killed processes and are removed.
STALE_TEMP_SECONDS = 3600.0


class Checkpoint:
    """One retry chain's checkpoint file, written atomically (temp file, fsync, rename).

    Args:
        path: the checkpoint file.
        study_uuid, chain_root: the owner; when given, a file saved by another owner is never
            loaded. Both or neither.
    """

    def __init__(
        self, path: str | Path, *, study_uuid: str | None = None, chain_root: int | None = None
    ) -> None:
        if (study_uuid is None) != (chain_root is None):
            raise ValueError(
                f"give both study_uuid and chain_root or neither, but got "
                f"{study_uuid=}, {chain_root=}"
            )
        self.path = Path(path)
        self.owner = None if study_uuid is None else {"study_uuid": study_uuid, "root": chain_root}

    @property
    def best_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.best.pt")

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None if there is none, it is unreadable or not ours."""
        import torch

        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable, truncated, or refused by weights_only
            logger.warning(
                "Ignoring checkpoint %s: it cannot be loaded safely (%s).",
                self.path,
                " ".join(str(e).split())[:300],
            )
            return None
        if not isinstance(saved, dict) or _OWNER not in saved:
            logger.warning("Ignoring checkpoint %s: it was not written by `search`.", self.path)
            return None
        if self.owner is not None and saved[_OWNER] != self.owner:
            logger.warning(
                "Ignoring checkpoint %s: it belongs to %s, not to %s.",
                self.path,
                saved[_OWNER],
                self.owner,
            )
            return None
        state: dict[str, Any] = saved[_STATE]
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint with `state`; a crash mid-write leaves the old one intact.

        Raises:
            DiskFullError: the filesystem is full (ENOSPC); the temp file is removed.
            CheckpointError: the file cannot be written for another reason.
        """
        import torch

        envelope = {_OWNER: self.owner or {}, _STATE: state}
        tmp = _write_temp(self.path, lambda handle: torch.save(envelope, handle))
        os.replace(tmp, self.path)

    def mark_best(self) -> None:
        """Keep the file as it is now (the epoch just saved) as this chain's best weights."""
        if not self.path.exists():
            return
        tmp = self.best_path.with_name(f".{self.best_path.name}.{os.getpid()}.link")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(self.path, tmp)
        except OSError:  # a filesystem without hard links: copy
            tmp = _write_temp(self.best_path, lambda h: h.write(self.path.read_bytes()))
        os.replace(tmp, self.best_path)

    def remove(self, *, keep_best: bool = False) -> None:
        """Delete the checkpoint (and its best-epoch copy unless `keep_best`)."""
        paths = [self.path] if keep_best else [self.path, self.best_path]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class Checkpoints:
    """The checkpoint folder of one study: `DIR/<study name>-<uuid prefix>/`.

    Args:
        directory: the checkpoint root (`--checkpoint-dir`, `workers.checkpoint_dir`).
        study_name: the study's name (for people browsing the folder).
        study_uuid: the study's `search.record.STUDY_UUID`, the real key.
    """

    def __init__(self, directory: str | Path, study_name: str, study_uuid: str) -> None:
        if not study_uuid:
            raise ValueError(f"study_uuid must be a non-empty string, but got {study_uuid=}")
        self.study_uuid = study_uuid
        self.folder = Path(directory) / f"{study_name}-{study_uuid[:12]}"

    def for_chain(self, root: int) -> Checkpoint:
        """The checkpoint of the retry chain that starts at trial number `root`."""
        return Checkpoint(
            self.folder / f"trial-{root}.pt", study_uuid=self.study_uuid, chain_root=root
        )

    def check_writable(self) -> None:
        """Create the folder and write a probe file; clear temp files of old failed saves.

        Raises:
            DiskFullError: the filesystem is full.
            CheckpointError: the folder cannot be created or written.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _error(e, f"cannot create checkpoint folder {self.folder}") from e
        probe = _write_temp(self.folder / "probe", lambda handle: handle.write(b"ok"))
        probe.unlink()
        self._remove_stale_temps()

    def finished(self, root: int, *, keep: bool) -> None:
        """The chain's trial ended: remove its checkpoint; `keep` keeps its best-epoch weights."""
        self.for_chain(root).remove(keep_best=keep)

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for path in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.info("Removed %s, left by a save that did not finish.", path)


def _write_temp(target: Path, write: Any) -> Path:
    """Write a new temp file beside `target` (never following a planted link); return it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise _error(e, f"cannot write in checkpoint folder {target.parent}") from e
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError | RuntimeError):
            raise _error(e, f"cannot save checkpoint {target}") from e
        raise
    return tmp


def _error(e: BaseException, what: str) -> CheckpointError:
    if _is_disk_full(e):
        return DiskFullError(
            f"{what}: disk full (no space left on the device); free space or point "
            "--checkpoint-dir (workers.checkpoint_dir) elsewhere"
        )
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointError(
        f"{what}: {' '.join(reason.split())[:200]}; use a writable --checkpoint-dir "
        "(or workers.checkpoint_dir)"
    )


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (torch's writer re-raises it as a RuntimeError)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False
