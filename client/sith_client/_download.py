"""Atomic, verified checkpoint download.

Chunks go to a hidden temp file next to the destination while a sha256 runs over them; only if the
size and digest match what the first chunk announced is the file fsynced and renamed into place,
with the mode an ordinary new file gets (0666 less the umask, like the sidecars the library
writes), not the temp file's 0600.
A crash, a dropped stream or a corrupt byte therefore never leaves a half-written checkpoint
where open_clip would happily try to load it. Within one download, a dropped stream resumes: the
next attempt asks for the bytes from ``written`` on, and ``begin`` checks that the server still
announces the same checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .errors import ChecksumMismatch

__all__ = ["AtomicDownload"]


class AtomicDownload:
    """Context manager: ``with AtomicDownload(path) as d: d.write(chunk)...; d.commit()``.

    ``path`` may be a directory, in which case the server's filename is used inside it.
    Leaving the block without ``commit()`` (or with an exception) deletes the temp file.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> None:
        self.requested = Path(path).expanduser()
        self.overwrite = overwrite
        self.path: Path | None = None
        self.expected_size: int | None = None
        self.expected_sha256: str | None = None
        self.written = 0
        self._hash = hashlib.sha256()
        self._tmp: Path | None = None
        self._fh: BinaryIO | None = None

    def __enter__(self) -> AtomicDownload:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._discard()

    def begin(self, *, filename: str, total_bytes: int, sha256: str) -> Path:
        """Open the temp file once the first chunk names the file, its size and digest.

        Called again by a resumed stream: then the announced size and digest must not have changed.
        """
        if self._fh is not None:
            if (int(total_bytes) or None, sha256.lower() or None) != (self.expected_size, self.expected_sha256):
                raise ChecksumMismatch("the server announced another checkpoint while resuming; download again")
            assert self.path is not None
            return self.path
        target = self.requested
        if target.is_dir() or str(self.requested).endswith(os.sep):
            target = target / (Path(filename).name or "checkpoint.safetensors")
        if target.exists() and not self.overwrite:
            raise FileExistsError(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        self._fh = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self.path = target
        self.expected_size = int(total_bytes) if total_bytes else None
        self.expected_sha256 = sha256.lower() or None
        return target

    def write(self, data: bytes, offset: int | None = None) -> None:
        if self._fh is None:
            raise RuntimeError("begin() must come first")
        if offset is not None and offset != self.written:
            raise ChecksumMismatch(f"chunk at offset {offset}, expected {self.written} (stream out of order)")
        self._fh.write(data)
        self._hash.update(data)
        self.written += len(data)
        if self.expected_size is not None and self.written > self.expected_size:
            raise ChecksumMismatch(f"received more than the announced {self.expected_size} bytes")

    def commit(self) -> Path:
        """Verify size and sha256, then fsync and atomically move the file into place."""
        if self._fh is None or self._tmp is None or self.path is None:
            raise ChecksumMismatch("the server sent no data")
        if self.expected_size is not None and self.written != self.expected_size:
            raise ChecksumMismatch(f"received {self.written} bytes, server announced {self.expected_size}")
        digest = self._hash.hexdigest()
        if self.expected_sha256 is None:
            raise ChecksumMismatch("the server announced no sha256; refusing an unverifiable checkpoint")
        if digest != self.expected_sha256:
            raise ChecksumMismatch(f"sha256 {digest} != announced {self.expected_sha256}")
        self._fh.flush()
        os.fchmod(self._fh.fileno(), 0o666 & ~_umask())
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)
        self._tmp = None
        _fsync_dir(self.path.parent)
        return self.path

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
