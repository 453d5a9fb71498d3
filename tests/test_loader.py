"""The training loader's workers ignore SIGTERM (so a run can checkpoint first): whatever happens to
their iterator, the process must still exit promptly."""

import subprocess
import sys
import time

import pytest

SCRIPT = """
import sys, time
import torch
from torch.utils.data import IterableDataset
from trainer.loader import epoch_batches, make_loader

class Slow(IterableDataset):
    def __init__(self, nap): self.nap = nap
    def __iter__(self):
        for i in range(10**6):
            if i == 2:
                time.sleep(self.nap)  # busy (or stuck in I/O) when told to stop
            yield torch.tensor([i])

case = sys.argv[1]
if case == "kept":  # an iterator made by hand and kept in a global: only the exit hook can stop its workers
    KEEP = iter(make_loader(Slow(0.0), 2, False))
    next(KEEP)
elif case == "busy":  # leave an epoch early while a worker sleeps: after torch's joins time out it is killed
    with epoch_batches(make_loader(Slow(600.0), 2, False)) as it:
        next(it); next(it)
print("returned", flush=True)
"""


@pytest.mark.parametrize("case", ["kept", "busy"])
def test_the_process_exits_promptly(case):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "returned" in p.stdout, p.stderr[-2000:]
    assert time.time() - t0 < 60, f"{case}: exit took {time.time() - t0:.0f} s"
    assert "Exception ignored" not in p.stderr, p.stderr[-2000:]


KILLED_PARENT = """
import os, signal, sys, time
import torch
from torch.utils.data import IterableDataset
from trainer.loader import make_loader

PID_FILE = sys.argv[1]

class Stuck(IterableDataset):
    def __iter__(self):
        with open(PID_FILE + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(PID_FILE + ".tmp", PID_FILE)  # the worker's pid, for the test
        time.sleep(600)  # blocked: torch's watchdog in the worker loop never runs
        yield torch.tensor([0])

it = iter(make_loader(Stuck(), 1, False))
deadline = time.time() + 60
while not os.path.exists(PID_FILE) and time.time() < deadline:  # the worker is asleep in __iter__ now
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
"""


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_main_process_even_when_blocked(tmp_path):
    import os

    pid_file = tmp_path / "worker.pid"
    with open(tmp_path / "stderr", "w") as err:  # not a pipe: a surviving worker must not block the test
        p = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(pid_file)], stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
        assert p.wait(timeout=120) == -9, (tmp_path / "stderr").read_text()[-2000:]
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        if _state(pid) in (None, "Z"):  # gone, or dead and waiting to be reaped by whoever adopted it
            return
        time.sleep(0.2)
    state = _state(pid)
    os.kill(pid, 9)
    pytest.fail(f"worker {pid} outlived its killed main process (state {state})")


STARTING_WORKERS = """
import os, signal, sys, time
import torch
from torch.utils.data import IterableDataset
import trainer.loader as loader
from trainer.interrupt import ignore_in_worker

def slow_start(worker_id, parent=None):
    time.sleep(1.0)  # the window between a worker's fork and its ignoring the stop signals
    ignore_in_worker(worker_id, parent)

loader.ignore_in_worker = slow_start
class DS(IterableDataset):
    def __iter__(self):
        for i in range(4):
            yield torch.tensor([i])
signal.signal(signal.SIGTERM, lambda *a: print("parent got SIGTERM", flush=True))
it = iter(loader.make_loader(DS(), 2, False))
for w in it._workers:
    os.kill(w.pid, signal.SIGTERM)  # as killpg(SIGTERM) of the rank's group at an epoch boundary
print("got", len(list(it)), flush=True)
"""


def test_a_stop_signal_while_workers_start_does_not_kill_them():
    """SIGTERM (torchrun's or SLURM's stop) that lands between a worker's fork and its
    ``ignore_in_worker`` would kill it ("DataLoader worker exited unexpectedly"): the stop signals
    are blocked across the fork, so the worker ignores it once it runs."""
    p = subprocess.run([sys.executable, "-c", STARTING_WORKERS], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "got 8" in p.stdout
