"""Crash-safe writes: everything the user keeps is written to a temporary name beside it, then renamed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path`, so `path` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def atomic_write_dir(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Like atomic_write for a directory: build it under a temporary name, then swap it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def link_or_copy_tree(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Mirror `src` into `dst` with hard links where the file system allows (no extra disk for a 9 GB text
    encoder), else copies. Existing files in `dst` are kept; top-level entries named in `skip` are left out."""
    src, dst = Path(src), Path(dst)
    for item in src.rglob("*"):
        relative = item.relative_to(src)
        if relative.parts[0] in skip:
            continue
        target = dst / relative
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


def sha256_files(paths: list[Path], memo: Path | None = None) -> str:
    """One sha256 over the names and contents of `paths`, in order (whole files: a fine-tune can leave any
    part of a weights file unchanged, so no sampling). With `memo` (a JSON file), a digest computed before for
    the same files, none changed since (same inode, size, mtime and ctime, as git tells a changed file), is read
    from it instead of reading the files again: IF-I-XL's weights are ~40 GB."""
    stamp = _stat_stamp(paths) if memo is not None else ""
    known = _read_memo(memo) if memo is not None else {}
    if stamp in known:
        return known[stamp]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    if memo is not None:
        # Last writer wins between two runs: a lost entry only means hashing again. The oldest entries go.
        known = _read_memo(memo)
        known.pop(stamp, None)
        known[stamp] = digest.hexdigest()
        with contextlib.suppress(OSError):
            kept = json.dumps(dict(list(known.items())[-MEMO_ENTRIES:]), indent=0)  # oldest first, not sorted
            atomic_write(memo, lambda tmp: tmp.write_text(kept + "\n"))
    return digest.hexdigest()


MEMO_ENTRIES = 256


def _stat_stamp(paths: list[Path]) -> str:
    # Taken before hashing: a file written during the hashing gets a new ctime, so its stamp never matches again.
    stats = [(str(Path(p).resolve()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
             for p, s in ((p, os.stat(p)) for p in paths)]
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        known = json.loads(Path(memo).read_text())
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return known if isinstance(known, dict) else {}


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool, on_wait: Callable[[], object] | None = None) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if missing) for the `with` block. The OS releases it when the
    process dies, so kill -9 leaves no stale lock. When another process holds it: with wait=False, yield False
    at once (nothing is locked then); with wait=True, call `on_wait` and block until it is free. The holder's
    pid is written into the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path: Path) -> str:
    """The pid written into a lock file by file_lock, or '?'."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest parent that does: where a directory to be made will live."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the file system that holds `path` (or its nearest parent)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def is_disk_full(err: BaseException) -> bool:
    """True for a failed write that ran out of space: ENOSPC/EDQUOT, or torch's and safetensors' wrappers of it
    (they raise RuntimeError/other types whose message carries the OS error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return "no space left" in text or "disk quota" in text or "file write failed" in text


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
