"""Writing files so that a reader or a crash never sees half of one.

In:  a destination path and its content (or a program that writes to a path).
Out: the file, replaced in one `os.replace` from a temporary file in the same folder.
Guarantees: the old file stays intact until the new one is complete; no temporary file
is left behind, whatever happens; a new file gets the permissions a plain `open()` would
give, a replaced one keeps its own; a symbolic link is written through (its target is
replaced, the link stays a link).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

# mkstemp creates 0600 files; outputs are meant to be shared like any other file. The
# umask is read once, at import, because reading it means setting it (not thread-safe).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    path = Path(os.path.realpath(path))  # through symlinks: replace the target, keep the link
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)  # `fmt` must not widen a private file
    except OSError:
        mode = FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
