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
import re
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


# The names `atomic_path` gives its temporary files: mkstemp's `.NAME.` + 8 random characters
# (tempfile's alphabet) + `.tmp`.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of `atomic_path` that a killed process (SIGKILL, power
    loss: no `finally` ran) left in `folder`, and return them. Only names of the writer's own
    pattern are touched. Call it only while no other process writes into `folder`.

    Example:
        >>> remove_stale_temporaries("runs/g/20261130-120000")          # doctest: +SKIP
        [PosixPath('runs/g/20261130-120000/.last.pt.k2j4h6g8.tmp')]
    """
    removed = []
    for path in Path(folder).iterdir():
        if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)
