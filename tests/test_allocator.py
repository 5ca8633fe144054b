"""keep_freed_memory: changes glibc's malloc settings when asked, and only then."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = "import continuum; print(continuum.keep_freed_memory())"


def _run(**env: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_malloc_unless_turned_off():
    assert _run() == "True"
    assert _run(CONTINUUM_KEEP_FREED_MEMORY="0") == "False"
