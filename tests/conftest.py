"""Shared helpers: tiny sweeps on synthetic data."""

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CONTINUUM_CACHE", tempfile.mkdtemp(prefix="continuum-cache-"))  # autotuned conv strategies
os.environ.setdefault("CONTINUUM_TUNE_MS", "20")  # tests check what is chosen is right, not that it is the fastest
if not torch.cuda.is_available():  # Triton kernels run in its interpreter, on the CPU; set before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_the_cores_between_test_workers() -> None:
    """Give each of pytest-xdist's workers, and the sweeps its tests start, its share of the cores, as a sweep's own
    local workers get theirs (a ``$OMP_NUM_THREADS`` set by the user stands). Each on every core instead, their
    threads waiting on each other: a sweep beside another process took 1.5-2x as long on a 2-core machine."""
    from continuum.sweep.workers import thread_env, worker_threads

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(worker_threads(workers))
        os.environ |= thread_env(workers)


_share_the_cores_between_test_workers()

SYNTHETIC = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--quiet"]
"""One epoch on the synthetic set, for tests that set the width themselves (``--match-params``)."""

FAST = [*SYNTHETIC, "--width", "0.25", "--train-size", "256", "--val-size", "128"]
"""Flags that make a sweep trial take about a second on a laptop CPU: a quarter-width net (99k parameters) on half
of the synthetic set."""


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Build the C++ kernels (:mod:`continuum.compiled`) side by side before pytest-xdist starts its workers: else
    the first test to need one builds it while every other worker that needs it waits, idle (once per machine;
    later runs load the built libraries in a second). One process (``-n 0``) builds each when a test first needs it.
    """
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return
    from continuum.compiled import build_all, building_allowed

    if building_allowed():
        config.get_terminal_writer().line("building the C++ kernels, unless built before (once per machine)")
        build_all()


@pytest.fixture
def fast_args():
    return list(FAST)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` as a module (the folder is not a package)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class PostgresServer:
    """A private PostgreSQL server on loopback for the tests; ``restart()`` bounces it."""

    url: str
    data: Path
    port: int
    socket_dir: Path
    bin_dir: Path
    as_user: list

    def ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -h 127.0.0.1"
        subprocess.run([*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options,
                        "-l", str(self.socket_dir / "server.log"), "-w", *args], check=True, capture_output=True)

    def restart(self) -> None:
        self.ctl("-m", "fast", "restart")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """Start a throw-away PostgreSQL server (Debian's ``postgresql`` package) for the session, or skip."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL absent: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is in .[dev]: pip install -e '.[dev]'")
    bin_dir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="continuum-pg-", dir="/tmp"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = _free_port()
    server = PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", data, port, root, bin_dir, as_user)
    server.ctl("start")
    yield server
    server.ctl("-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def native_kernels():
    """For bit-exact comparisons: segmented convs run as the plain grouped conv, not the autotuned strategy
    (which agrees only up to float rounding)."""
    from continuum import conv_strategy

    with conv_strategy("native"):
        yield


@pytest.fixture
def building_on():
    """For tests that build the C++ kernels: skipped where ``$CONTINUUM_BUILD_KERNELS=0`` turns building off."""
    from continuum.compiled import building_allowed
    from continuum.files import BUILD_KERNELS

    if not building_allowed():
        pytest.skip(f"${BUILD_KERNELS}=0 turns the C++ kernels' builds off")


@pytest.fixture
def dynamo_counters(monkeypatch):
    """``torch.compile`` with dynamo alone (its ``eager`` backend: no code generation, seconds rather than minutes),
    nothing compiled before, and dynamo's counters of frames, graphs and graph breaks, cleared."""
    import torch
    from torch._dynamo.utils import counters

    compile_eagerly = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_eagerly(model, backend="eager"))
    torch.compiler.reset()
    counters.clear()
    return counters
