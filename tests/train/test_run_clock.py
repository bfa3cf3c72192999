"""A run's time budget leaves out the time its process is stopped (kill -STOP), so pausing
a long run for a benchmark does not move its cosine schedule on."""

import json
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import FER_MINI, ROOT

STOP_SECONDS = 6.0

CLOCK_SCRIPT = """
import time
from train.run_clock import RunClock
clock = RunClock()
start, wall = clock.now(), time.perf_counter()
print("ready", flush=True)
time.sleep(9)
print(clock.now() - start, time.perf_counter() - wall, clock.paused_seconds, flush=True)
"""


def stop_for(process: subprocess.Popen, seconds: float) -> None:
    process.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    process.send_signal(signal.SIGCONT)


def test_the_clock_stands_still_while_the_process_is_stopped():
    child = subprocess.Popen([sys.executable, "-c", CLOCK_SCRIPT], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    stop_for(child, STOP_SECONDS)
    counted, wall, paused = map(float, child.stdout.readline().split())
    assert child.wait(timeout=30) == 0
    assert wall >= 9.0
    # The watchdog books a stop to within its 0.5 s wake-up interval.
    assert STOP_SECONDS - 1.0 <= paused <= STOP_SECONDS + 0.5
    assert abs(counted - (wall - paused)) < 0.1


def test_a_stopped_run_keeps_its_time_budget(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "train", "fit", "--model", "resnet", "--opt", "width=4",
               "--opt", "blocks=[1,1,1,1]", "--data", str(FER_MINI), "--run-dir", str(run_dir),
               "--batch-size", "16", "--threads", "1", "--max-batches-per-epoch", "2",
               "--epochs", "1000", "--early-stop-patience", "1000", "--time-budget", "8s"]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    history = run_dir / "history.json"
    while not history.exists() and child.poll() is None:
        time.sleep(0.2)  # stop it mid-run, once an epoch is done
    stop_for(child, STOP_SECONDS)
    assert child.wait(timeout=120) == 0
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    epochs = json.loads(history.read_text())
    assert checkpoint["paused_seconds"] >= STOP_SECONDS - 1.0
    assert abs(sum(e.get("paused_seconds", 0) for e in epochs)
               - checkpoint["paused_seconds"]) < 0.2
    # The stopped epoch counted its training only, and the run went on to spend its budget.
    assert max(e["seconds"] for e in epochs) < STOP_SECONDS - 1.0
    assert checkpoint["wall_seconds"] >= 8.0 - max(e["seconds"] for e in epochs)
