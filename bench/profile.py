"""Where POST /predict spends its time: `python -m bench.profile`.

Spawns `uvicorn service.app:app`, drives it with `bench.load` at one concurrency, and
samples the server with `py-spy record` (all threads, idle ones left out) for the same
time. Prints the functions holding the most samples: inclusive (the function or
anything it called was on the CPU) and self (the function itself was). Native frames
are not unwound, so time in OpenCV or ONNX Runtime shows up on the Python line that
called it (`detectMultiScale`, `session.run`), which is the level we act on.
`--raw FILE` keeps the collapsed stacks (load them in speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.load import main_async as load_main
from bench.load import print_table, spawn_server
from bench.stores import resolve_store

ROOT = Path(__file__).resolve().parent.parent
# Frames on every stack of their thread, left out of the inclusive table.
PLUMBING = ("threading.py", "concurrent/futures/", "<frozen runpy>", "click/", "uvicorn/main.py",
            "uvicorn/__main__.py", "uvicorn/_compat.py", "uvicorn/server.py", "asyncio/runners.py")


def summarize(collapsed: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        # With --threads the first frame is the thread: "thread (1234): cpu_0".
        threads[frames[0].split("): ", 1)[-1]] += samples
        names = [_short(f) for f in frames[1:]] or ["<thread>"]
        for name in set(names):
            if not any(part in name for part in PLUMBING):
                inclusive[name] += samples
        own[names[-1]] += samples
    print(f"# {total} samples (non-idle) over all threads")
    print("## by thread")
    for name, samples in threads.most_common(8):
        print(f"{100 * samples / total:6.1f}%  {name}")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"## top {top} by {title} samples")
        for name, samples in counter.most_common(top):
            print(f"{100 * samples / total:6.1f}%  {name}")


def _short(frame: str) -> str:
    """'detect (service/detector.py:68)' with site-packages paths cut to the package."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if "site-packages/" in where:
        where = where.split("site-packages/", 1)[1]
    elif str(ROOT) in where:
        where = where.split(str(ROOT) + "/", 1)[1]
    return f"{name} ({where})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "natural-faces"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--env", action="append", default=[], metavar="FER_X=VALUE")
    parser.add_argument("--raw", type=Path, default=None, help="keep the collapsed stacks here")
    args = parser.parse_args(argv)
    if not Path(args.photos).is_dir():
        args.photos = str(ROOT / "tests" / "fixtures" / "faces")
    store = resolve_store(args.store)
    env = {"FER_RELOAD_INTERVAL_S": "0", "FER_LOG_LEVEL": "WARNING",
           **dict(pair.split("=", 1) for pair in args.env)}
    server = spawn_server(store, args.port, env)
    raw = args.raw or Path(tempfile.mkstemp(suffix=".txt")[1])
    try:
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid),
             "--rate", str(args.rate), "--duration", str(int(args.seconds) + 1), "--threads",
             "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        load_args = argparse.Namespace(
            photos=args.photos, model=None, concurrency=[args.concurrency],
            seconds=args.seconds, url=f"http://127.0.0.1:{args.port}")
        rows = asyncio.run(load_main(load_args))
        _, errors = spy.communicate(timeout=60)
        if spy.returncode:
            raise SystemExit(f"py-spy failed: {errors.strip()}")
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"# store {store}, {os.cpu_count()} cores, concurrency {args.concurrency}, "
          f"env {env}")
    print_table(rows)
    summarize(raw, args.top)
    if args.raw is None:
        raw.unlink()


if __name__ == "__main__":
    main()
