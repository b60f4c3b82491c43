"""Writing a file so that a reader never sees it half written (OneActor's character files, the evaluation tools'
outputs): a temporary file in the same folder, fsync, mode 0644, then ``os.replace``."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes, make_folder: bool = False) -> None:
    """Write ``data`` to ``path``; on any failure (OSError, an interrupt) the temporary file is removed and ``path``
    is left as it was. ``make_folder``: create missing parent folders first (else a missing folder is an OSError)."""
    path = Path(path)
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
