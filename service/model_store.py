"""The versioned model store: `<root>/<model>/<version>/{model.onnx,model.json}`.

As in Triton's model repository, version folders are positive integers without a
leading zero, in ASCII digits; anything else is ignored. A version that fails to load is
logged and listed under `failures`, and never stops the others from serving. `sync()` can
be called again at any time (the service polls it) to pick up new or removed versions.

A name that is not loaded is `UnknownModel` (404) unless it is configured, i.e. a folder
of the store or named by the ensemble: then it is `ModelNotLoaded` (503 + Retry-After),
as during start-up or while every version of it fails to load.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.card import CARD_FILENAME, INT8_FILENAME, MODEL_FILENAME
from service.errors import Overloaded, ServiceError
from service.onnx_model import ModelLoadError, OnnxModel

log = logging.getLogger("service.model_store")

ENSEMBLE_NAME = "ensemble"
ENSEMBLE_VERSION = 1


class UnknownModel(ServiceError, LookupError):
    status = 404
    code = "unknown_model"


class UnknownVersion(ServiceError, LookupError):
    status = 404
    code = "unknown_version"


class ModelNotLoaded(Overloaded):
    """A configured model that is not loaded (yet): retry later."""

    code = "not_ready"


@dataclass(frozen=True)
class Target:
    """What a request runs: one model version, or the members of the ensemble."""

    name: str
    version: int
    members: tuple[OnnxModel, ...]
    temperature: float = 1.0  # applied to the log of the members' mean (ensemble only)

    @property
    def is_ensemble(self) -> bool:
        return self.name == ENSEMBLE_NAME


ENSEMBLE_CALIBRATION = "ensemble.json"


def read_ensemble_calibration(root: Path) -> tuple[list[str], float] | None:
    """The member versions and temperature in `<store>/ensemble.json`, or None when the
    file is absent or unusable."""
    try:
        calibration = json.loads((Path(root) / ENSEMBLE_CALIBRATION).read_text())
        members, temperature = sorted(calibration["members"]), float(calibration["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (members, temperature) if 0.0 < temperature <= 100.0 else None


def ensemble_temperature(calibration: tuple[list[str], float] | None,
                         members: tuple[OnnxModel, ...]) -> float:
    """The fitted temperature when `calibration` was fitted for exactly these member
    versions; 1.0 for any other set, or when there is none."""
    if calibration is None:
        return 1.0
    fitted_for, temperature = calibration
    return temperature if fitted_for == sorted(f"{m.name}:{m.version}" for m in members) else 1.0


@dataclass
class SyncResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def parse_version(text: str) -> int | None:
    """A version number written in ASCII digits without a leading zero, else None.

    (`str.isdigit` is true for "²" and "١", which `int` rejects or reads as 1.)"""
    if text.isascii() and text.isdigit() and not text.startswith("0"):
        return int(text)
    return None


def is_version_folder(path: Path) -> bool:
    return parse_version(path.name) is not None and path.is_dir()


def select_versions(versions: list[int], policy: str) -> list[int]:
    versions = sorted(versions)
    if policy == "all" or not versions:
        return versions
    if policy == "latest":
        return versions[-1:]
    wanted = {parse_version(v.strip()) for v in policy.split(",") if v.strip()}
    return [v for v in versions if v in wanted]


def parse_member(member: str) -> tuple[str, int | None]:
    """An ensemble member: `name` (its latest version) or `name:version` (pinned)."""
    name, _, version = member.partition(":")
    if not name:
        raise ValueError(f"ensemble member {member!r}: the model name is missing")
    number = parse_version(version)
    if version and number is None:
        raise ValueError(f"ensemble member {member!r}: the version must be a number >= 1")
    return name, number


class ModelStore:
    def __init__(
        self,
        root: Path,
        policy: str = "all",
        providers: list[str] | None = None,
        threads: int = 1,
        ensemble_members: list[str] | None = None,
        int8: str = "off",
    ) -> None:
        self.root = Path(root)
        self.policy = policy
        self.providers = providers or ["CPUExecutionProvider"]
        # FER_INT8=auto: a version's int8 graph where its card says it was kept on this CPU's
        # int8 kernel family (OnnxModel decides per version), on the CPU provider only.
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.precision = "auto" if int8 == "auto" and on_cpu else "fp32"
        self.threads = threads
        self.ensemble_members = ensemble_members or []
        self._members = [parse_member(member) for member in self.ensemble_members]
        self._models: dict[str, dict[int, OnnxModel]] = {}
        self._failures: dict[str, str] = {}
        self._failed_stamps: dict[str, tuple[float, ...]] = {}
        self._lock = threading.Lock()
        self._ensemble_calibration: tuple[list[str], float] | None = None

    # -- discovery and loading ----------------------------------------------------------
    def discover(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return found
        for model_dir in self._model_folders():
            try:
                versions = [int(p.name) for p in model_dir.iterdir() if is_version_folder(p)]
            except OSError as error:  # e.g. unreadable: the other models still load
                log.error("cannot read %s: %s", model_dir, error)
                continue
            selected = select_versions(versions, self.policy)
            if selected:
                found[model_dir.name] = selected
        return found

    def _model_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir()
                      and p.name != ENSEMBLE_NAME and not p.name.startswith("."))

    def is_configured(self, name: str) -> bool:
        """Whether `name` is meant to be served: a folder of the store, or the ensemble or
        one of its members."""
        if name == ENSEMBLE_NAME:
            return len(self._members) >= 2
        if name in {member for member, _ in self._members}:
            return True
        try:
            return name in {p.name for p in self._model_folders()}
        except OSError:
            return False

    def sync(self) -> SyncResult:
        """Load what appeared, drop what disappeared; safe to call from a worker thread."""
        with self._lock:
            result = SyncResult()
            wanted = self.discover()
            models = {name: dict(versions) for name, versions in self._models.items()}
            for name, versions in list(models.items()):
                for version in list(versions):
                    if version not in wanted.get(name, []):
                        del versions[version]
                        result.unloaded.append(f"{name}/{version}")
                if not versions:
                    del models[name]
            for name, versions in wanted.items():
                for version in versions:
                    key = f"{name}/{version}"
                    if version in models.get(name, {}):
                        continue
                    folder = self.root / name / str(version)
                    stamp = _stamp(folder)
                    if self._failed_stamps.get(key) == stamp:
                        continue  # failed before and unchanged since: don't retry every poll
                    try:
                        model = OnnxModel(folder, self.providers, self.threads, self.precision)
                        model.warm_up()
                    except (ModelLoadError, OSError, ValueError, RuntimeError) as error:
                        self._failures[key] = str(error)
                        self._failed_stamps[key] = stamp
                        result.failed.append(key)
                        log.error("refused model %s: %s", key, error)
                        continue
                    self._failures.pop(key, None)
                    self._failed_stamps.pop(key, None)
                    models.setdefault(name, {})[version] = model
                    result.loaded.append(key)
                    log.info("loaded model %s on %s (%s)", key, model.provider, model.precision)
            for key in list(self._failures):
                name, version = key.split("/")
                if int(version) not in wanted.get(name, []):
                    self._failures.pop(key)
                    self._failed_stamps.pop(key, None)
            self._models = models  # one assignment: readers see the old or the new dict
            self._ensemble_calibration = read_ensemble_calibration(self.root)
            return result

    # -- lookup -------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, dict[int, OnnxModel]]:
        return self._models

    @property
    def failures(self) -> dict[str, str]:
        return dict(self._failures)

    def loaded_count(self) -> int:
        return sum(len(versions) for versions in self._models.values())

    def names(self) -> list[str]:
        names = sorted(self._models)
        if self.ensemble_ready():
            names.append(ENSEMBLE_NAME)
        return names

    def ensemble_ready(self) -> bool:
        return len(self._members) >= 2 and all(
            name in self._models and (version is None or version in self._models[name])
            for name, version in self._members
        )

    def get(self, name: str, version: int | None = None) -> OnnxModel:
        versions = self._models.get(name)
        if not versions:
            if self.is_configured(name):
                raise ModelNotLoaded(f"model {name!r} is not loaded (yet); loaded: {self.names()}")
            raise UnknownModel(f"unknown model {name!r}; loaded: {self.names()}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise UnknownVersion(
                f"model {name!r} has no version {version}; loaded: {sorted(versions)}"
            )
        return versions[version]

    def resolve(self, name: str, version: int | None = None) -> Target:
        if name == ENSEMBLE_NAME:
            if not self.is_configured(name):
                raise UnknownModel(f"the ensemble is not configured; loaded: {self.names()}")
            if version not in (None, ENSEMBLE_VERSION):
                raise UnknownVersion(f"the ensemble has only version {ENSEMBLE_VERSION}")
            if not self.ensemble_ready():
                raise ModelNotLoaded(
                    f"the ensemble needs models {self.ensemble_members} loaded; "
                    f"loaded: {sorted(self._models)}"
                )
            members = tuple(self.get(name, version) for name, version in self._members)
            return Target(ENSEMBLE_NAME, ENSEMBLE_VERSION, members,
                          ensemble_temperature(self._ensemble_calibration, members))
        model = self.get(name, version)
        return Target(model.name, model.version, (model,))


def _stamp(folder: Path) -> tuple[float, ...]:
    stamps = []
    for filename in (MODEL_FILENAME, CARD_FILENAME, INT8_FILENAME):
        try:
            stamps.append((folder / filename).stat().st_mtime)
        except OSError:  # absent or unreadable
            stamps.append(-1.0)
    return tuple(stamps)
