"""Files a run reads back that could have been damaged or planted: checksums that prove a checkpoint is whole,
loading without unpickling arbitrary objects, the lock that keeps one run per output folder, and disk-full
errors said in one line.

A checkpoint folder is untrusted input (it may come from shared storage): its torch files load with
`weights_only=True`, so a planted pickle's payload never runs, and a file that fails that, or whose bytes
differ from the checksum its metadata.json records, makes the checkpoint damaged, named in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dpo_lightning.errors import UserError

CHUNK = 8 << 20  # hashlib releases the GIL on large updates: two files hash at once on two cores
FILES = "files"  # metadata.json's record of every file: relative path -> {"bytes", "sha256"}
LOCK = ".lock"  # in output_dir: held (flock) by the run writing there


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing, torn, altered or holds more than tensors and plain values."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(folder: Path, only: tuple[str, ...] | None) -> list[str]:
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != "metadata.json")
    if only is not None:
        files = (p for p in files if p.parent == folder and any(p.match(pattern) for pattern in only))
    return sorted(str(p.relative_to(folder)) for p in files)


def file_checksums(folder: Path, only: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` (metadata.json aside), or of the files
    at its root that match one of the patterns `only`."""
    folder = Path(folder)
    names = _files_under(folder, only)
    digests = _digests(folder, names)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": digests[name]} for name in names}


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(lambda name: sha256_of(folder / name), names), strict=True))


def checksum_problem(folder: Path, recorded: dict[str, Any]) -> str | None:
    """Why the files under `folder` are not the ones `recorded` (metadata.json's FILES) describes, or None."""
    folder = Path(folder)
    for name, entry in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, {entry.get('bytes')} were written"
    digests = _digests(folder, sorted(recorded))
    for name, digest in digests.items():
        if digest != recorded[name].get("sha256"):
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def safe_torch_load(path: Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """A torch file holding tensors and plain values only (`weights_only=True`); anything else, or a torn file,
    is a `DamagedCheckpoint` named in one line, its payload never run."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"damaged checkpoint: {path} is missing") from None
    except Exception as exc:  # UnpicklingError (a planted object), RuntimeError / EOFError (a torn file)
        raise DamagedCheckpoint(
            f"damaged checkpoint: {path} cannot be loaded as tensors and plain values ({_load_failure(exc)}); "
            "nothing in it was run. Resume from another checkpoint (--resume PATH) or remove this one"
        ) from None


def _load_failure(exc: Exception) -> str:
    """The part of torch's refusal that names the culprit: the global a planted object needs, or the first
    line of a torn file's error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds an object of {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


# ----------------------------------------------------------------------------- one run per folder


class RunLock:
    """An exclusive OS lock (flock) on `<output_dir>/.lock`: the OS releases it when the process dies, however
    it dies, so a killed run never blocks the next one. Nested holders in one process share it. A folder the
    lock itself created, and that holds nothing else when it is released (a run refused before it wrote
    anything), is removed again."""

    _held: dict[Path, list] = {}  # path -> [descriptor, holders, whether acquiring created the folder]

    def __init__(self, output_dir: Path) -> None:
        self.path = (Path(output_dir) / LOCK).resolve()
        self._holding = False

    def acquire(self) -> RunLock:
        held = RunLock._held.get(self.path)
        if held is None:
            created = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            RunLock._held[self.path] = [self._locked_descriptor(), 0, created]
        RunLock._held[self.path][1] += 1
        self._holding = True
        return self

    def _locked_descriptor(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UserError(
                        f"{self.path.parent} is in use by another run ({holder}): two runs in one output_dir "
                        "would interleave their reports and checkpoints; wait for it to end or give another "
                        "output_dir"
                    ) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed while this process opened it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)

    def release(self) -> None:
        if not self._holding:
            return
        self._holding = False
        held = RunLock._held[self.path]
        held[1] -= 1
        if held[1] > 0:
            return
        del RunLock._held[self.path]
        fd, _, created = held
        if created and [p.name for p in self.path.parent.iterdir()] == [LOCK]:
            self.path.unlink()  # still locked: no other run can take it in between
            self.path.parent.rmdir()
        os.close(fd)  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------- a full disk

FULL_BELOW_BYTES = 1 << 20  # a write that failed with less than this left was out of space, whatever it said


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a failed write to `path` ran out of space: ENOSPC or EDQUOT, or a library's own error (torch's
    writer says only "unexpected pos") on a filesystem with next to nothing left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def writing(what: str, path: Path, kept: str):
    """Turn a write that runs out of space into one line: what was being written, where, and what is intact."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, path):
            raise
        raise UserError(
            f"no space left on the device writing {what} to {path}; {kept}. Free space and run again"
        ) from None


# ----------------------------------------------------------------------------- replacing a folder

RENAME_EXCHANGE = 2  # linux/fs.h


def replace_folder(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`, atomically: at every moment `target` is the old folder or the new one,
    never absent (Linux's renameat2 exchange; elsewhere a rename aside and back, absent for an instant)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # it now holds the old folder
        return
    aside = target.with_name(f".{target.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0
