"""Where continuum keeps files, and how it writes them: one cache root, one atomic write."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_CACHE = Path("~/.cache/continuum")
"""Cache root when no environment variable names one."""


def cache_root(variable: str = "CONTINUUM_CACHE") -> Path:
    """The folder named by ``$variable``, else ``~/.cache/continuum``.

    Args:
        variable: ``CONTINUUM_CACHE`` (autotuned strategies) or ``CONTINUUM_DATA`` (datasets).
    """
    return Path(os.environ.get(variable) or DEFAULT_CACHE.expanduser())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file under a temporary name in its folder, then rename it into place, so that a reader (or a crash)
    never sees half a file.

    Args:
        path: the final file.
        write: writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def made_folder(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (and its missing parents) for the body; if the body fails, remove what was made, so a
    failure leaves no empty folders behind.

    Args:
        folder: the folder to make.
    """
    made = [path for path in (*reversed(folder.parents), folder) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise
