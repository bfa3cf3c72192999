"""Every setting of the service, read from `FER_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.detector import DetectorConfig, DetectorName
from service.model_store import parse_member
from service.retinaface import RetinaFaceConfig

# The detection defaults live with the detectors.
_DETECTOR = DetectorConfig()
_RETINAFACE = RetinaFaceConfig()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FER_", protected_namespaces=())

    # Models
    model_store: Path = Field(
        Path("model_store"), description="Root of <model>/<version>/ folders."
    )
    default_model: str = Field("cnn10", description="Model used when a request names none.")
    version_policy: str = Field(
        "all", description="Versions to load: 'all', 'latest', or a comma list such as '1,3'."
    )
    ensemble: str = Field(
        "cnn10,resnet",
        description="Models averaged by the virtual 'ensemble' model: `name` (its latest "
        "version) or `name:version` (pinned), comma-separated; empty disables it.",
    )
    reload_interval_s: float = Field(
        30.0, ge=0, description="Poll the model store for new/removed versions; 0 = never."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider: CUDA when available (auto), or forced."
    )
    int8: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on the CPU provider, run a version's int8 graph (model.int8.onnx, "
        "`python -m train quantize`) where its card says it was kept (validation accuracy "
        "within 0.3 points of model.onnx, and the same top-1 class on at least 95 % of "
        "validation faces) on this CPU's int8 kernel family (8-bit dot product: "
        "AVX512-VNNI, AVX-VNNI, Arm dotprod; or AVX2 without one; `train quantize --check` "
        "measures another); off, on CUDA or where that kernel was not measured: model.onnx. "
        "A kept int8 file that is missing, altered or unloadable refuses that version at load "
        "(listed under /v1/models failures). Names and versions in answers stay the same; "
        "/v1/models shows each version's precision.",
    )

    # Dynamic batching (per model version)
    max_batch_size: int = Field(32, ge=1, le=1024, description="Faces per inference batch.")
    max_delay_ms: float = Field(
        2.0, ge=0, le=1000, description="Longest a face waits for others to join its batch."
    )
    max_queue_faces: int = Field(
        512, ge=1, description="Faces waiting per model before new requests get 503."
    )
    queue_timeout_ms: float = Field(
        5000, gt=0, description="A face not run within this time fails its request with 503."
    )

    # Face detection
    detector: DetectorName = Field(
        "haar",
        description="Face detector: 'haar' (OpenCV's Haar cascade, the papers' method; the "
        "FER_DETECT_* settings) or 'retinaface' (RetinaFace-MobileNet0.25 on ONNX Runtime, "
        "the FER_RETINAFACE_* settings: finds more faces, and gives five landmarks per face, "
        "with which the face is aligned when its model's card says so). Checked at start-up.",
    )
    retinaface_max_side: int = Field(
        _RETINAFACE.max_side, ge=64, le=4096,
        description="Longest side of the image RetinaFace sees (larger images are shrunk "
        "first): its cost grows with the pixels; faces under about 10 px there are missed.",
    )
    retinaface_max_pixels: int = Field(
        _RETINAFACE.max_pixels, ge=64 * 64, le=4096 * 4096,
        description="Most pixels of the image RetinaFace sees (larger images are shrunk "
        "first): a 320x180 frame's by default, so a square photo is searched at 240 px.",
    )
    retinaface_score_threshold: float = Field(
        _RETINAFACE.score_threshold, gt=0, lt=1,
        description="RetinaFace's face probability a detection needs.",
    )
    retinaface_model: Path | None = Field(
        None,
        description="The RetinaFace ONNX file; unset = service/weights/retinaface_mnet025.onnx, "
        "shipped with the service (MIT, see its README). One that is missing or is not "
        "RetinaFace stops the start-up.",
    )
    haar_cascade: str = Field(
        _DETECTOR.cascade,
        description="Haar cascade: one of OpenCV's frontal-face cascades by name ('default', "
        "'alt', 'alt2', 'alt_tree') or the path of a cascade XML file. One that cannot be "
        "read stops the start-up.",
    )
    detect_max_side: int = Field(
        _DETECTOR.max_side, ge=64,
        description="Longest side of the image searched for faces (border included): bounds the "
        "cost of detection, the dominant cost; faces under min_size x (1 + 2 x border) / "
        "max_side of the image's longest side (22 % by default, 15 % in the second search) are "
        "not found."
    )
    detect_scale_factor: float = Field(
        _DETECTOR.scale_factor, gt=1.0, le=2.0,
        description="Haar pyramid step: smaller finds more faces, slower.",
    )
    detect_min_neighbors: int = Field(
        _DETECTOR.min_neighbors, ge=0, le=50,
        description="Overlapping hits a face needs: larger = fewer false faces, more misses.",
    )
    detect_min_size: int = Field(
        _DETECTOR.min_size, ge=8, description="Smallest face side, detection pixels."
    )
    detect_equalize: bool = Field(
        _DETECTOR.equalize, description="Equalise the histogram before detection."
    )
    detect_border: float = Field(
        _DETECTOR.border, ge=0, le=1,
        description="Black border (fraction of the longest side) added before "
        "detection, so faces that fill the frame are found.",
    )
    detect_border_min_face: float = Field(
        _DETECTOR.border_min_face, ge=0, le=1,
        description="Faces under this fraction of the image's shorter side are searched without "
        "the border (less area to scan), larger ones with it; 0 = every size with the border.",
    )
    detect_room_check: bool = Field(
        _DETECTOR.room_check,
        description="With that split, search the large faces first, then faces under half "
        "the largest one's side only in the strips beside it where one fits: none in most "
        "close-ups, a third less detection CPU there. false = the whole image at every size.",
    )
    detect_fallback_max_side: int = Field(
        _DETECTOR.fallback_max_side, ge=0,
        description="A second Haar search, only of images in which the first found no face, "
        "with this longest side (border included); 0 = none.",
    )
    detect_fallback_border: float = Field(
        _DETECTOR.fallback_border, ge=0, le=1, description="Border of the second search."
    )
    detect_fallback_min_neighbors: int = Field(
        _DETECTOR.fallback_min_neighbors, ge=0, le=50,
        description="min_neighbors of the second search.",
    )
    max_faces: int = Field(_DETECTOR.max_faces, ge=1, description="Largest faces kept per image.")

    # Limits
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest upload.")
    max_pixels: int = Field(40_000_000, ge=1024, description="Largest image, width x height.")
    max_inflight_requests: int = Field(
        64, ge=1, description="Requests in decode/detect at once; more get 503 + Retry-After."
    )
    upload_timeout_s: float = Field(
        30.0, gt=0, description="An upload not fully received within this time gets 408, so a "
        "client trickling its body in cannot hold a connection and its buffer for ever.",
    )

    # WebSocket streams (/v1/stream)
    stream_max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024,
        description="Largest frame or command; a larger one gets an error reply. The server's "
        "own WebSocket limit (uvicorn --ws-max-size, 16 MiB) closes the stream with 1009.",
    )
    stream_max_streams: int = Field(
        32, ge=1, description="Open streams per process; more are closed with 1013."
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="A stream with no message for this long is closed (1000)."
    )
    stream_smoothing: float = Field(
        0.5, gt=0, le=1,
        description="Weight of the newest frame in each tracked face's moving average; 1 = none.",
    )

    # Access (see service/auth.py)
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated API keys for POST /predict and /v1/stream; empty = no "
        "authentication. A request presents one as 'Authorization: Bearer <key>' or "
        "'X-API-Key: <key>' (a WebSocket also as ?api_key=<key>); else 401 (a stream: close "
        "1008). /, /static, /docs, /openapi.json, /v1/models, /healthz, /readyz and /metrics "
        "stay open.",
    )
    rate_limit_per_minute: int = Field(
        0, ge=0,
        description="Requests (and stream connects) per minute per API key, or per client IP when "
        "no keys are set; bursts up to one minute's worth; more get 429 + Retry-After; 0 = off.",
    )

    # Threads
    cpu_threads: int = Field(
        0, ge=0, description="Threads for decoding and detection; 0 = one per core."
    )
    ort_threads: int = Field(
        1, ge=0,
        description="ONNX Runtime intra-op threads per model session; 0 = one per core. Each "
        "model has its own inference thread and the ensemble's members run side by side, so "
        "1 fills the cores without oversubscribing them: measured faster than one per core "
        "(python -m bench.ort_threads; README, performance).",
    )

    # Logging
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, with the request id on each."
    )
    log_level: str = Field("INFO", description="Level of the service's own loggers.")

    @field_validator("ensemble")
    @classmethod
    def ensemble_members_parse(cls, ensemble: str) -> str:
        for member in ensemble.split(","):
            if member.strip():
                parse_member(member.strip())
        return ensemble

    @field_validator("version_policy")
    @classmethod
    def policy_is_known(cls, policy: str) -> str:
        policy = policy.strip()
        if policy in ("all", "latest"):
            return policy
        try:
            versions = [int(v) for v in policy.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                "version_policy must be 'all', 'latest' or a comma list of integers") from None
        if not versions or min(versions) < 1:
            raise ValueError("version_policy lists no valid version")
        return policy

    @property
    def ensemble_members(self) -> list[str]:
        return [name.strip() for name in self.ensemble.split(",") if name.strip()]

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]

    @property
    def detector_config(self) -> DetectorConfig:
        return DetectorConfig(
            cascade=self.haar_cascade, max_side=self.detect_max_side,
            scale_factor=self.detect_scale_factor,
            min_neighbors=self.detect_min_neighbors, min_size=self.detect_min_size,
            equalize=self.detect_equalize, border=self.detect_border,
            border_min_face=self.detect_border_min_face,
            room_check=self.detect_room_check, max_faces=self.max_faces,
            fallback_max_side=self.detect_fallback_max_side,
            fallback_border=self.detect_fallback_border,
            fallback_min_neighbors=self.detect_fallback_min_neighbors,
        )

    @property
    def retinaface_config(self) -> RetinaFaceConfig:
        return RetinaFaceConfig(
            max_side=self.retinaface_max_side, max_pixels=self.retinaface_max_pixels,
            score_threshold=self.retinaface_score_threshold,
            max_faces=self.max_faces,
            model_path=self.retinaface_model or _RETINAFACE.model_path,
        )

    @property
    def cores(self) -> int:
        return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)

    @property
    def effective_cpu_threads(self) -> int:
        return self.cpu_threads or self.cores

    @property
    def effective_ort_threads(self) -> int:
        return self.ort_threads or self.cores


@lru_cache
def get_settings() -> Settings:
    return Settings()


def markdown_table() -> str:
    """The configuration table of the README: `python -m service.settings`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `FER_{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())  # noqa: T201
