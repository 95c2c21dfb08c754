"""Artefacts: every file a job makes, addressed by a key relative to one root.

Datasets, adapters, tuned heads, predictions and cards live under ``artifact_root``
(``FINDISTIL_HOME`` by default; a shared mount when several machines work on the same jobs)
and the database stores their **keys** (``jobs/<job id>/candidates/0/adapter``), never
absolute paths, so an API on one machine can serve and delete what a worker on another wrote.

``ArtifactStore`` is the narrow seam: ``path`` (a key's local path, for libraries that need
files), ``exists``, ``read_text``, ``write_text`` and ``delete``. An object-store version
(fsspec) would implement the same five methods with a local cache behind ``path``.

Also here, the one implementation of the crash-safe write patterns the rest of findistil uses:
``write_files_atomically`` (temp file + rename), ``staged_dir`` (build a folder beside its
target, then swap it in), ``build_once`` (the same under an exclusive file lock, for caches
that several processes may fill at once) and ``file_lock``.

    store = ArtifactStore(settings.artifacts_root)
    with staged_dir(store.path(job_key(job_id, "datasets"))) as tmp:
        (tmp / "eval_data.jsonl").write_text(...)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

_SEGMENT = re.compile(r"^[A-Za-z0-9_.@+=-]+$")


class ArtifactKeyError(ValueError):
    """A key that is absolute, climbs out of the root, or holds odd characters."""


def job_key(job_id: str, *parts: str | int) -> str:
    """The key of a job's artefact: ``job_key(j, "candidates", 0, "adapter")``."""
    return "/".join(["jobs", job_id, *(str(p) for p in parts)])


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path of safe segments, else ``ArtifactKeyError``."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key:
        raise ArtifactKeyError(f"artefact key {key!r} must be a relative path like jobs/<id>/...")
    parts = PurePosixPath(key).parts
    if any(p in {".", ".."} or not _SEGMENT.match(p) for p in parts):
        raise ArtifactKeyError(f"artefact key {key!r} has an unsafe segment")
    return key


class ArtifactStore:
    """Artefacts under a local (or mounted) folder. ``ArtifactStore(Path("/mnt/shared"))``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()

    def path(self, key: str) -> Path:
        """Where the artefact ``key`` lies on this machine (it may not exist yet)."""
        return self.root / check_key(key)

    def key_for(self, path: Path | str) -> str:
        """The key of a local path under the root (``ArtifactKeyError`` outside it)."""
        try:
            rel = Path(path).absolute().relative_to(self.root)
        except ValueError:
            raise ArtifactKeyError(f"{path} is not under the artefact root {self.root}") from None
        return check_key(rel.as_posix())

    def exists(self, key: str | None) -> bool:
        return bool(key) and self.path(key).exists()

    def read_text(self, key: str) -> str:
        return self.path(key).read_text(encoding="utf-8")

    def write_text(self, key: str, text: str) -> None:
        write_files_atomically({self.path(key): text})

    def delete(self, key: str) -> None:
        """Remove a file or a whole folder; a missing key is not an error."""
        path = self.path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ----------------------------------------------------------------- crash-safe writes


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_files_atomically(files: dict[Path, str]) -> None:
    """Write every file to a temp name beside it, then rename each into place.

    A reader sees each file whole or not at all; a failure leaves no temp file behind.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _temp_beside(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def install(tmp: Path, target: Path) -> None:
    """Move a finished file or folder into place, replacing an older one at the last moment."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` to build in; it replaces ``target`` when the block
    ends normally and is removed when it raises, so ``target`` is never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_once(
    target: Path, build: Callable[[Path], None], *, ready: Callable[[Path], bool] = Path.exists
) -> Path:
    """Create ``target`` by ``build(tmp)`` at most once across processes.

    The first caller takes ``<target>.lock`` and builds into ``tmp`` (a path beside
    ``target`` that ``build`` creates, as a file or a folder), then renames it into place;
    callers waiting on the lock find ``target`` ready and return at once.
    """
    if ready(target):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if ready(target):  # another process finished while we waited
            return target
        tmp = _temp_beside(target)
        try:
            build(tmp)
            install(tmp, target)  # also replaces a stale partial target of an older writer
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
    return target
