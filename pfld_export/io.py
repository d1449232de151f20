"""The one atomic-write helper: every file the tool writes goes through here.

A reader (or a crash) never sees a half-written file at the destination: data goes to a temp
file in the same directory, is flushed and fsynced, then `os.replace`d into place.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError, UsageError

# errno values that mean "this output cannot be written here", not a bug in the writer.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENOENT}


def _check_dir(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {parent}: {e.strerror}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable; choose a writable --out")


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed.

    Use it for writers that want a file name (cv2.imwrite, torch.save, matplotlib savefig).
    `suffix` defaults to the destination's suffix, because some writers pick the format from it.
    """
    # Write failures (disk full, read-only folder, ...) become one `OutputError` here, the one
    # place every file passes through, instead of a traceback from whichever writer hit them.
    dest = Path(path)
    tmp_path = _temp_beside(dest, suffix)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; a deliverable gets what any other new file would (0666 - umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        err = _write_failure(dest, e)
        if err is not None:
            raise err from None
        raise


def _temp_beside(dest: Path, suffix: str | None) -> Path:
    """An empty hidden temp file in `dest`'s folder (same filesystem, so os.replace is atomic).

    It keeps the destination's suffix unless told otherwise, because cv2.imwrite / savefig choose
    the format from it.
    """
    _check_dir(dest)
    sfx = dest.suffix if suffix is None else suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=sfx, dir=dest.parent)
    except OSError as e:
        raise _output_error(dest, e) from None
    os.close(fd)
    return Path(tmp)


def _write_failure(dest: Path, e: BaseException) -> OutputError | None:
    """The typed error for a failed write, or None when `e` is not about the output (a bug,
    an interrupt, a typed error of the writer's own)."""
    if isinstance(e, OutputError):
        return e
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        # An error about some other file (an input the writer reads) is not an output failure.
        if e.filename is None or Path(os.fsdecode(e.filename)).parent == dest.parent:
            return _output_error(dest, e)
        return None
    # Some writers (torch.save's zip writer, encoders) report a short write as a RuntimeError
    # ("unexpected pos ..."): a full disk is then the cause worth naming.
    if isinstance(e, (RuntimeError, ValueError)) and _disk_full(dest.parent):
        return _output_error(dest, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return None


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    # "Full" for a writer that just failed: less than one block (or one inode) left.
    return st.f_bavail * st.f_frsize < max(st.f_frsize, 4096) or (st.f_files > 0 and st.f_favail == 0)


def _output_error(dest: Path, e: OSError) -> OutputError:
    fix = {errno.ENOSPC: "free space there or choose another --out", errno.EDQUOT: "free space there or choose another --out",
           errno.EFBIG: "choose another --out"}.get(e.errno or 0, "choose a writable --out")
    return OutputError(f"cannot write {dest} ({e.strerror or e}); {fix}")


@dataclass
class FileSet:
    """Files that are written together or not at all (a result set such as eval.json + ced.png).

    `path(dest)` hands out a temp path beside `dest`; nothing appears at any destination until
    every member is written and synced, and a failure in any member removes them all.
    """

    _staged: list[tuple[Path, Path]] = field(default_factory=list)

    def path(self, dest: str | os.PathLike[str], suffix: str | None = None) -> Path:
        """A temp path to write `dest` into (the writer picks the format from its suffix)."""
        d = Path(dest)
        tmp = _temp_beside(d, suffix)
        self._staged.append((tmp, d))
        return tmp

    def write_bytes(self, dest: str | os.PathLike[str], data: bytes) -> Path:
        tmp = self.path(dest)
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise _output_error(Path(dest), e) from None
        return Path(dest)

    def write_json(self, dest: str | os.PathLike[str], obj: Any) -> Path:
        return self.write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())

    def _commit(self) -> None:
        mode = 0o666 & ~_umask()
        for tmp, dest in self._staged:
            try:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
            except OSError as e:
                raise _output_error(dest, e) from None
        # Renames take no space: once every member is on disk the set appears in one go.
        for tmp, dest in self._staged:
            os.replace(tmp, dest)
        self._staged.clear()

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()


@contextmanager
def file_set() -> Iterator[FileSet]:
    """Write several files as one result set: all appear at the end, or none (see `FileSet`)."""
    fs = FileSet()
    try:
        yield fs
        fs._commit()
    except BaseException as e:
        dests = [d for _, d in fs._staged]
        fs._discard()
        err = next((x for x in (_write_failure(d, e) for d in dests[-1:]) if x is not None), None)
        if err is not None:
            raise err from None
        raise


def _umask() -> int:
    try:  # Linux reports it without touching it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


@contextmanager
def locked_dir(path: str | os.PathLike[str], flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on an output folder for a whole run (created if needed).

    Two runs writing one folder would leave a report describing only the last writer; the
    second now stops at once. The lock is flock(2) on the folder itself (no lock file left
    behind; the kernel drops it if the process dies). A folder this run created and left empty
    (an early failure) is removed again.
    """
    d = Path(path)
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UsageError(f"cannot create output folder {d}: {e.strerror}; choose a writable {flag}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another pfld-export run is writing into {d}; wait for it to finish or choose another {flag}") from None
        try:
            yield d
        finally:
            if created:
                try:
                    d.rmdir()  # only succeeds when nothing was written
                except OSError:
                    pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write bytes atomically; returns the destination path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically; returns the destination path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON (indented, sorted keys, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays and Paths show up in result dataclasses; keep JSON writing boring.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_CKPT_SUFFIXES = (".tar", ".pth", ".pt", ".ckpt", ".bin")


def model_stem(path: Path) -> str:
    name = path.name
    while Path(name).suffix.lower() in _CKPT_SUFFIXES + (".onnx",):
        name = Path(name).stem
    return name


def writable_dir(out: Path) -> Path:
    """Fail before minutes of work, not after: the folder takes a file, or could be created.

    A folder that does not exist yet is not created here (the writers create it when the first
    file is ready), so a run that fails early leaves no empty --out behind.
    """
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a folder")
        if probe == out:
            with tempfile.TemporaryFile(dir=out):
                pass
        elif not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(13, f"{probe} is not writable")
    except OSError as e:
        raise UsageError(f"output folder {out} is not writable ({e.strerror}); choose a writable --out") from None
    return out
