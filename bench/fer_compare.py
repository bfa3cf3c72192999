"""Side by side with the `fer` package: `python -m bench.fer_compare`.

`fer` (PyPI, github.com/justinshenk/fer) is the best-known open-source FER package:
OpenCV's Haar cascade (with `mtcnn=False`) and a Keras mini-Xception, run by default as
a quantised TensorFlow Lite model; its weights ship inside the wheel.

In ONE run, on the same photos (../shared/data/natural-faces if present, else
tests/fixtures/faces) and the same cores (children inherit this process's CPU set,
`--cpus` narrows it), this times:

* fer: `FER(mtcnn=False).detect_emotions(img)` after `cv2.imdecode`, in its own
  virtualenv (`.cache/fer-venv`, created on first use), through `bench/fer_worker.py`;
  once as one process (how the library is used) and once as one process per core;
* ours over HTTP: a spawned `uvicorn service.app:app` on 127.0.0.1, POST /predict
  sequentially and at `--concurrency`, one server per detector of `--detectors` (default
  both: `haar`, the default, and `FER_DETECTOR=retinaface`), plus one more server per
  `--variant`, e.g. `--variant FER_DETECT_MAX_SIDE=240`, to compare settings in the same run;
* ours in-process: the same `Runtime` and `Pipeline.predict` without HTTP.

Everything is warmed up first. Then each configuration runs `--seconds` per round, the
configurations alternate for `--repeats` rounds (so background load slows all alike),
and the median round is printed with CPU time per image. Accuracy is the top label of
the largest face against labels.csv (or the folder name); no face found counts as wrong.

The fer virtualenv gets `fer` without its declared dependencies (they include
facenet-pytorch, which pins an old CUDA torch build, and moviepy/ffmpeg/matplotlib/
pandas for video), plus what `FER(mtcnn=False)` imports: tensorflow-cpu,
opencv-contrib-python-headless (<5: 5.x has no CascadeClassifier), pillow, requests.
The worker runs with HTTP(S)_PROXY pointing at a closed local port, so any attempt to
download at run time fails instead of passing unnoticed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.ab import Server
from bench.load import run_level
from bench.models import cores
from bench.stores import resolve_store

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".cache" / "fer-venv"
NATURAL = ROOT.parent / "shared" / "data" / "natural-faces"
FIXTURES = ROOT / "tests" / "fixtures" / "faces"
FER_VERSION = "25.10.3"
FER_REQUIREMENTS = [
    # fer runs its TFLite model through tf.lite.Interpreter, deprecated since TF 2.20
    # (checked with 2.21): pinned below the next release in case it goes.
    "tensorflow-cpu>=2.16,<2.22", "opencv-contrib-python-headless>=4.10,<5", "pillow", "requests",
    "setuptools<81",  # fer imports pkg_resources
]
# fer's emotion names -> ours (the same FER2013 words; listed so a rename shows up here).
FER_TO_OURS = {"angry": "angry", "disgust": "disgust", "fear": "fear", "happy": "happy",
               "sad": "sad", "surprise": "surprise", "neutral": "neutral"}
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "NO_PROXY": "", "no_proxy": ""}


def ensure_fer_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import fer.fer, tensorflow, cv2; cv2.CascadeClassifier"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"# creating {venv} (fer {FER_VERSION}, tensorflow-cpu; a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", f"fer=={FER_VERSION}"], check=True)
    subprocess.run([*pip, *FER_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def labelled_photos(folder: Path) -> list[tuple[Path, str]]:
    labels = folder / "labels.csv"
    if labels.is_file():
        with labels.open() as f:
            photos = [(folder / row["image"], row["label"]) for row in csv.DictReader(f)]
    else:
        photos = [(p, p.parent.name) for p in sorted(folder.glob("*/*.jpg"))]
    if not photos:
        raise SystemExit(f"no labelled photos under {folder} (<folder>/<label>/*.jpg)")
    return photos


class FerWorkers:
    """`count` fer processes, each holding the photos, driven over stdin/stdout."""

    def __init__(self, python: Path, paths: list[Path], count: int, keras: bool) -> None:
        env = {**os.environ, **NO_NETWORK, "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": ""}
        argv = [str(python), str(ROOT / "bench" / "fer_worker.py"),
                *(["--keras"] if keras else []), *map(str, paths)]
        self.processes = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            for _ in range(count)
        ]
        self.info = [self._read(p) for p in self.processes][0]

    @staticmethod
    def _read(process: subprocess.Popen) -> dict:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"the fer worker exited ({process.wait()}); run bench/fer_worker.py "
                             "by hand in the fer venv to see why")
        return json.loads(line)

    def ask(self, command: dict, count: int | None = None) -> list[dict]:
        chosen = self.processes[: count or len(self.processes)]
        for process in chosen:  # all start together, then all are read
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
        return [self._read(p) for p in chosen]

    def timed(self, seconds: float, count: int) -> tuple[float, float]:
        results = self.ask({"cmd": "time", "seconds": seconds}, count)
        images = sum(r["images"] for r in results)
        wall = max(r["wall_s"] for r in results)
        return images / wall, 1000 * sum(r["cpu_s"] for r in results) / images

    def close(self) -> None:
        for process in self.processes:
            try:
                process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                process.stdin.close()
                process.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()


async def http_round(client: httpx.AsyncClient, server: Server, photos: list[bytes],
                     concurrency: int, seconds: float, query: str) -> tuple[float, float]:
    cpu = server.cpu_seconds()
    row = await run_level(client, server.url, photos, concurrency, seconds, query)
    if row["errors"]:
        raise SystemExit(f"{row['errors']} requests failed: {row['statuses']}")
    return row["rps"], 1000 * (server.cpu_seconds() - cpu) / row["requests"]


async def labels_over_http(client: httpx.AsyncClient, server: Server, photos: list[bytes],
                           query: str) -> list[str | None]:
    labels = []
    for data in photos:
        response = await client.post(f"{server.url}/predict{query}", content=data,
                                     headers={"content-type": "image/jpeg"})
        response.raise_for_status()
        faces = response.json()["faces"]
        labels.append(faces[0]["label"] if faces else None)  # largest face first
    return labels


async def inproc_round(runtime, target, photos: list[bytes], concurrency: int,
                       seconds: float) -> tuple[float, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            await runtime.pipeline.predict(photos[index % len(photos)], target, True)
            index += concurrency
            done += 1

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / done


async def compare(args: argparse.Namespace, fer: FerWorkers, labelled: list[tuple[Path, str]],
                  store: Path) -> None:
    from service.runtime import Runtime
    from service.settings import Settings

    photos = [p.read_bytes() for p, _ in labelled]
    query = f"?model={args.model}" if args.model else ""
    specs = {"ours": ",".join(f"{k}={v}" for k, v in args.env.items())}
    for variant in args.variant:
        specs[variant] = ",".join(f"{k}={v}" for k, v in {**args.env, **parse_env(variant)}.items())
    servers = {label: Server(f"label={label}," + spec, store) for label, spec in specs.items()}
    runtime = Runtime(Settings(model_store=store, reload_interval_s=0, **args.settings))
    await runtime.start()
    try:
        for server in servers.values():
            server.wait_ready()
        while not runtime.ready:
            await asyncio.sleep(0.05)
        target = runtime.resolve(args.model, None)
        limits = httpx.Limits(max_connections=args.concurrency + 4)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            # Accuracy (which also warms every server up), then a timed warm-up of each.
            predicted = {"fer": [FER_TO_OURS.get(x) if x else None
                                 for x in fer.ask({"cmd": "predict"}, 1)[0]["labels"]]}
            for label, server in servers.items():
                predicted[label] = await labels_over_http(client, server, photos, query)
                await run_level(client, server.url, photos, args.concurrency, 1.0, query)
            for data in photos:
                await runtime.pipeline.predict(data, target, True)
            await inproc_round(runtime, target, photos, args.concurrency, 1.0)

            fer_n = len(fer.processes)
            configs = {
                ("fer", 1): lambda: asyncio.to_thread(fer.timed, args.seconds, 1),
                ("fer", fer_n): lambda: asyncio.to_thread(fer.timed, args.seconds, fer_n),
            }
            for label, server in servers.items():
                for n in (1, args.concurrency):
                    configs[(label, n)] = lambda s=server, n=n: http_round(
                        client, s, photos, n, args.seconds, query)
            for n in (1, args.concurrency):
                configs[("in-process", n)] = lambda n=n: inproc_round(
                    runtime, target, photos, n, args.seconds)
            results: dict[tuple[str, int], list[tuple[float, float]]] = {k: [] for k in configs}
            for _ in range(args.repeats):
                for key, start in configs.items():
                    results[key].append(await start())
    finally:
        await runtime.stop()
        for server in servers.values():
            server.stop()

    median = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
              for k, v in results.items()}
    fer_one = median[("fer", 1)][0]
    fer_best = max(median[("fer", 1)][0], median[("fer", fer_n)][0])
    info = fer.info
    members = ", ".join(m.name for m in target.members)
    detector = args.env.get("FER_DETECTOR", "haar")
    names = {"fer": f"fer {info['fer']} FER(mtcnn=False) {info['engine']}; processes",
             "ours": f"ours HTTP /predict ({target.name}, {detector}); clients",
             "in-process": "ours in-process Pipeline.predict; concurrent calls"}
    for variant in args.variant:
        names[variant] = f"ours HTTP, {variant}; clients"
    print(f"# {len(photos)} photos from {args.photos}, {cores()} cores "
          f"({','.join(map(str, sorted(os.sched_getaffinity(0))))}), {args.seconds:.1f}s x "
          f"{args.repeats} alternating rounds (median); store {store}; model {target.name} "
          f"({members}); ours' settings {args.env or 'default'}")
    print(f"# fer: tensorflow {info['tensorflow']}, opencv {info['opencv']}, weights "
          f"{info['weights']}")
    print("# CPU ms/img: CPU time of the server or fer processes per image (HTTP client excluded;"
          " in-process includes the benchmark's own loop)")
    header = f"{'system':<66} {'n':>3} {'images/s':>9} {'CPU ms/img':>10} {'x fer 1 proc':>12}"
    print(header)
    print("-" * len(header))
    for (kind, n), (rate, cpu) in median.items():
        print(f"{names[kind]:<66} {n:>3} {rate:>9.1f} {cpu:>10.1f} {rate / fer_one:>12.2f}")
    fer_cpu = min(median[("fer", 1)][1], median[("fer", fer_n)][1])
    for label in servers:
        best = max(median[(label, 1)][0], median[(label, args.concurrency)][0])
        cpu = min(median[(label, 1)][1], median[(label, args.concurrency)][1])
        print(f"{label}: images/s ratio over HTTP (best of 1 and {args.concurrency} clients) / fer "
              f"(best of 1 and {fer_n} processes) = {best:.1f} / {fer_best:.1f} = "
              f"{best / fer_best:.2f}x; CPU-time ratio fer / ours = {fer_cpu:.1f} / {cpu:.1f} ms "
              f"= {fer_cpu / cpu:.2f}x")
    print("# The images/s ratio is what this run saw; on a machine shared with other work it "
          "also reflects how much CPU each side won. The CPU-time ratio is the images/s ratio "
          "to expect when both saturate the same idle cores.")
    truth = [label for _, label in labelled]
    for who, labels in predicted.items():
        correct = sum(p == t for p, t in zip(labels, truth, strict=True))
        found = sum(p is not None for p in labels)
        print(f"accuracy {who:<28} {correct:>2}/{len(truth)} = {correct / len(truth):.3f} "
              f"(a face found in {found}/{len(truth)}; none found counts as wrong)")
    cards = json.dumps([json.loads((m.folder / "model.json").read_text()) for m in target.members])
    if "untrained" in cards:
        print("# NOTE: our models here are untrained stand-ins of the real sizes: our accuracy "
              "means nothing until model_store/ holds the trained models")


def parse_env(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split(",") if pair)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path,
                        default=NATURAL if NATURAL.is_dir() else FIXTURES)
    parser.add_argument("--store", type=Path, default=None,
                        help="default: model_store/ if it has cnn10 and resnet, else an "
                             "untrained stand-in of the real sizes")
    parser.add_argument("--model", default=None, help="?model= for ours (default: server's)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fer-processes", type=int, default=0, help="0 = one per core")
    parser.add_argument("--fer-keras", action="store_true",
                        help="fer's Keras .hdf5 model instead of its default TFLite one")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--cpus", default=None, help="pin everything to these cores, e.g. 0,1")
    parser.add_argument("--env", action="append", default=[], metavar="FER_X=VALUE",
                        help="settings for all of ours (servers and in-process)")
    parser.add_argument("--variant", action="append", default=[], metavar="FER_X=V[,FER_Y=W]",
                        help="one more server with these settings, timed in the same run")
    parser.add_argument("--detectors", default="haar,retinaface",
                        help="one server per detector (FER_DETECTOR), the first as 'ours'")
    parser.add_argument("--setup-only", action="store_true", help="create the fer venv and stop")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    args.env = {k: v for pair in args.env for k, v in parse_env(pair).items()}
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if not detectors or set(detectors) - {"haar", "retinaface"}:
        raise SystemExit(f"--detectors: haar and/or retinaface, got {args.detectors!r}")
    if detectors[0] != "haar":
        args.env.setdefault("FER_DETECTOR", detectors[0])
    args.variant[:0] = [f"FER_DETECTOR={d}" for d in detectors[1:]]
    args.settings = {k.removeprefix("FER_").lower(): v for k, v in args.env.items()}
    python = ensure_fer_venv(args.venv)
    if args.setup_only:
        return
    store = resolve_store(args.store)
    labelled = labelled_photos(args.photos)
    fer = FerWorkers(python, [p for p, _ in labelled], args.fer_processes or cores(),
                     args.fer_keras)
    try:
        asyncio.run(compare(args, fer, labelled, store))
    finally:
        fer.close()


if __name__ == "__main__":
    main()
