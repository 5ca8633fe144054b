"""Where continuum keeps files, and how it writes them: one cache root, one atomic write; and how an on/off
environment variable reads."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from continuum.knobs import parse_bool

DEFAULT_CACHE = Path("~/.cache/continuum")
"""Cache root when no environment variable names one."""


def cache_root(variable: str = "CONTINUUM_CACHE") -> Path:
    """The folder named by ``$variable``, else ``~/.cache/continuum``.

    Args:
        variable: ``CONTINUUM_CACHE`` (autotuned strategies) or ``CONTINUUM_DATA`` (datasets).
    """
    return Path(os.environ.get(variable) or DEFAULT_CACHE.expanduser())


BUILD_KERNELS = "CONTINUUM_BUILD_KERNELS"
"""On/off: build (and use) the compiled C++ kernels (:mod:`continuum.compiled`); unset: on."""

KEEP_FREED_MEMORY = "CONTINUUM_KEEP_FREED_MEMORY"
"""On/off: keep freed memory in the process instead of returning it to the system (:mod:`continuum.allocator`);
unset: on."""

SWITCHES = (BUILD_KERNELS, KEEP_FREED_MEMORY)
"""Every on/off environment variable, checked before a run starts."""


def env_switch(variable: str, default: bool = True) -> bool:
    """Whether ``$variable`` is on: 1/true/on/yes or 0/false/off/no; ``default`` when it is unset or empty.

    Raises:
        ValueError: any other value, naming the variable and what it may say.
    """
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return parse_bool(text)
    except ValueError:
        raise ValueError(f"{variable}={os.environ[variable]!r} is not valid; use 1 or 0 (on, off)") from None


STALE_TEMP_SECONDS = 600
"""A temporary file of :func:`atomic_write` from another machine this old was left by a killed writer (a write
takes seconds)."""


def _left_by_a_dead_writer(temp: Path) -> bool:
    """Whether ``temp`` (named ``.NAME.HOST.PID.XXXX.tmp`` by :func:`atomic_write`) was left by a writer that is
    gone: a process of this machine that no longer runs, or any writer :data:`STALE_TEMP_SECONDS` ago."""
    parts = temp.name.rsplit(".", 4)
    try:
        if len(parts) == 5 and parts[1] == socket.gethostname() and parts[2].isdigit():
            os.kill(int(parts[2]), 0)
            return False
        return time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS
    except ProcessLookupError:
        return True
    except OSError:  # the process exists but is not ours, or the file went meanwhile
        return False


def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file under a temporary name in its folder, then rename it into place, so that a reader (or a crash)
    never sees half a file. The file gets the mode ``open()`` would give it; temporary files of the same target
    left by a killed writer are removed.

    Args:
        path: the final file.
        write: writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.*.tmp"):
        if _left_by_a_dead_writer(left):
            left.unlink(missing_ok=True)
    prefix = f".{path.name}.{socket.gethostname()}.{os.getpid()}."
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, _file_mode())
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


def check_writable_folder(folder: Path, option: str) -> None:
    """Refuse a folder that cannot be made or written into: a file in its place (or on its path), or a read-only
    place.

    Args:
        folder: the folder to write into (it may not exist yet).
        option: the command-line option that named it, for the message.

    Raises:
        ValueError: naming the path and the fix.
    """
    nearest = next(path for path in (folder, *folder.parents) if path.exists())
    if not nearest.is_dir():
        raise ValueError(f"{option} {folder}: {nearest} is a file, not a folder; use {option} FOLDER")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder}: {nearest} is read-only; use {option} with a writable folder")
    try:  # a folder that says it is writable and is not (/proc, /sys, a full or vanished mount)
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise ValueError(f"{option} {folder}: cannot write in {nearest} ({error.strerror}); use {option} with a "
                         "writable folder") from None
