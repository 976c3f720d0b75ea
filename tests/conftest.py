import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside DataLoader workers. An explicit
# OMP_NUM_THREADS wins (.ci/run's second pass runs the numerics tests on one thread).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models train and big ones build fastest on one torch thread: two threads on a busy 2-core machine mostly
    spin in OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (a writer killed mid-write, as temp-file sweeps see it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Seen once in ~10 loaded runs: a gloo rank aborts at interpreter exit ("terminate called without an active
# exception", SIGABRT) after its work, files included, is done and its process group destroyed (PyTorch's gloo
# teardown, cf. pytorch/pytorch#179291). Such a run is retried once; any other failure fails the test at once.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGS`` on one thread each."""

    def run(module: str, args: Sequence[str], *, nproc: int = 2, timeout: float = 300, cwd=None):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", module, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if done.returncode != 0 and GLOO_TEARDOWN_ABORT in done.stderr:
            warnings.warn("a gloo rank aborted at exit; retrying the torchrun once", stacklevel=2)
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run


@pytest.fixture
def stop_after() -> Callable[[int], object]:
    """A training ``Progress`` that interrupts the run (as Ctrl-C would) once N epochs are finished and saved."""
    from robust_enc.train.epoch import Progress

    class StopAfter(Progress):
        def __init__(self, epochs: int) -> None:
            self.epochs = epochs

        def end_epoch(self, row: dict) -> None:
            if row["epoch"] == self.epochs:
                raise KeyboardInterrupt

    return StopAfter
