"""One model version: an ONNX Runtime session plus the card that says how to feed it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service import cpu_features
from service.card import CARD_FILENAME, CLASSES, INT8_FILENAME, MODEL_FILENAME, ModelCard
from service.preprocess import softmax
from service.tta import merge_tta, tta_views, with_tta

log = logging.getLogger("service.model")


class ModelLoadError(RuntimeError):
    pass


class ModelOutputError(RuntimeError):
    """The graph ran but returned something other than finite logits [N, 7]."""


def choose_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("FER_DEVICE=cuda but ONNX Runtime offers only %s; using the CPU", available)
    return ["CPUExecutionProvider"]


# Which graph of a version to run: model.onnx, its int8 file, or the int8 file only where
# the card says it was kept (FER_INT8=auto).
Precision = Literal["fp32", "int8", "auto"]


class OnnxModel:
    def __init__(self, folder: Path, providers: list[str], threads: int,
                 precision: Precision = "fp32", int8_graph: Path | None = None) -> None:
        """`int8_graph`: an int8 file to run instead of the card's (while it is measured)."""
        self.folder = folder
        try:
            self.card = ModelCard.read(folder / CARD_FILENAME)
        except FileNotFoundError:
            raise ModelLoadError(f"{folder} has no {CARD_FILENAME}") from None
        except ValueError as error:
            raise ModelLoadError(f"{folder / CARD_FILENAME} is invalid: {error}") from None
        if self.card.version != int(folder.name) or self.card.name != folder.parent.name:
            raise ModelLoadError(
                f"{folder} holds a card for {self.card.name}/{self.card.version}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads spin by default, burning the cores that decoding and
        # detection (and other processes) need between batches: with spinning, 1.8-2.5x
        # fewer images/s on 2 cores (bench/RESULTS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.precision, graph, source = self._choose_graph(precision, int8_graph)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types
            way_out = "; FER_INT8=off serves model.onnx" if self.precision == "int8" else ""
            raise ModelLoadError(f"{graph} cannot be loaded: {error}{way_out}") from None
        self._check_signature()
        self.provider = self.session.get_providers()[0]
        self.input_name = self.card.input.name
        self.output_name = self.card.output.name

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> int:
        return self.card.version

    @property
    def input_size(self) -> int:
        return self.card.input.size

    def _choose_graph(self, precision: Precision,
                      int8_graph: Path | None) -> tuple[str, Path, str | bytes]:
        """(precision, path, what ONNX Runtime loads) for the requested precision."""
        int8 = self.card.int8
        if precision == "auto":
            kernel = cpu_features.int8_kernel()
            precision = "int8" if int8 is not None and int8.kept_on(kernel) else "fp32"
            if int8 is not None and int8.kept and precision == "fp32":
                log.warning("%s: its int8 graph was not measured on this CPU's int8 kernels (%s; "
                            "measured: %s); serving fp32. python -m train quantize --check "
                            "measures it here", self.folder, kernel,
                            ", ".join([int8.kernel, *int8.checks]))
        if precision == "fp32":
            return "fp32", self.folder / MODEL_FILENAME, str(self.folder / MODEL_FILENAME)
        if int8_graph is not None:
            return "int8", int8_graph, str(int8_graph)
        path = self.folder / (int8.file if int8 is not None else INT8_FILENAME)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ModelLoadError(f"{path} (int8) cannot be read: {error.strerror or error}; "
                                 "FER_INT8=off serves model.onnx") from None
        if int8 is not None and int8.sha256 and hashlib.sha256(data).hexdigest() != int8.sha256:
            raise ModelLoadError(f"{path} does not match the sha256 in its card's int8 field; "
                                 "re-run python -m train quantize, or FER_INT8=off serves "
                                 "model.onnx")
        return "int8", path, data  # the bytes that were checked are the bytes loaded

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        spec = self.card.input
        graph_input = inputs.get(spec.name)
        if graph_input is None or len(inputs) != 1:
            raise ModelLoadError(f"graph inputs {list(inputs)} do not match the card's "
                                 f"{spec.name!r}")
        if graph_input.type != "tensor(float)":
            raise ModelLoadError(f"input {spec.name!r} is {graph_input.type}, expected float32")
        shape = graph_input.shape
        if len(shape) != 4 or [shape[1], shape[2], shape[3]] != [1, spec.size, spec.size]:
            raise ModelLoadError(f"input shape {shape} does not match the card's {spec.shape}")
        if isinstance(shape[0], int):
            raise ModelLoadError("the batch axis of the input must be dynamic")
        graph_output = outputs.get(self.card.output.name)
        if graph_output is None or graph_output.shape[-1] != len(CLASSES):
            raise ModelLoadError(
                f"output {self.card.output.name!r} must have {len(CLASSES)} classes"
            )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Normalised NCHW float32 faces -> class probabilities [N, 7] (with the card's TTA
        and temperature)."""
        logits = self.logits(batch)
        return merge_tta(softmax(logits / np.float32(self.card.temperature)),
                         tta_views(self.card.tta))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits [V * N, 7] of the card's TTA variants, laid out as `with_tta` does."""
        feed = self.views(batch)
        (logits,) = self.session.run([self.output_name], {self.input_name: feed})
        # A broken graph must fail its batch here (the batcher answers inference_failed),
        # not later as a 500 while the answer is built or serialised.
        if logits.shape != (len(feed), len(CLASSES)):
            raise ModelOutputError(f"output {self.output_name!r} has shape {logits.shape}, "
                                   f"expected {(len(feed), len(CLASSES))}")
        if not np.isfinite(logits).all():
            raise ModelOutputError(f"output {self.output_name!r} is not finite (NaN or inf)")
        return logits.astype(np.float32)

    def views(self, batch: np.ndarray) -> np.ndarray:
        """What `logits` feeds the graph for a normalised batch: the card's TTA views."""
        return with_tta(batch, self.card.tta) if self.card.tta else batch

    def warm_up(self) -> None:
        self.infer(np.zeros((1, 1, self.input_size, self.input_size), dtype=np.float32))
