"""FER_INT8: which graph the service runs for a version whose card has an int8 result, and
the committed int8 graphs against their fp32 ones."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import cpu_features
from service.card import CARD_FILENAME, INT8_FILENAME, Int8Check, ModelCard
from service.model_store import ModelStore, is_version_folder
from service.onnx_model import ModelLoadError, OnnxModel
from service.preprocess import WHOLE_IMAGE_CROP, crop_face, normalize, whole_image_box
from service.settings import Settings
from tests.conftest import (
    COMMITTED_STORE,
    FER_MINI,
    SHARED_FER2013,
    build_store,
    needs_fer2013,
    running_app,
)
from train.data import load_split
from train.quantize import MIN_AGREEMENT, KeepBudget, QuantizeConfig, quantize_version

FACE = FER_MINI / "validation" / "happy" / "018.png"


# This machine's int8 kernel family, before the fixture below pretends otherwise.
REAL_KERNEL = cpu_features.int8_kernel()


@pytest.fixture(autouse=True)
def dot_product_kernel(monkeypatch):
    """Every test here runs as on a CPU with an 8-bit dot product, the kernel family the
    test store's graph is measured on, whatever CPU runs the suite; the ones that need
    another case say so."""
    monkeypatch.setattr(cpu_features, "int8_kernel", lambda: "dot_product")


@pytest.fixture(scope="module")
def quantized_store(tmp_path_factory) -> Path:
    """The test store (untrained cnn10 and a small resnet) with resnet/1 quantized and kept."""
    store = build_store(tmp_path_factory.mktemp("int8_store"))
    train = load_split(FER_MINI, "train", cache_dir=None)
    validation = load_split(FER_MINI, "validation", cache_dir=None)
    with pytest.MonkeyPatch.context() as patch:  # module scope: set up before the autouse one
        patch.setattr(cpu_features, "int8_kernel", lambda: "dot_product")
        quantize_version(store / "resnet" / "1", train, validation, QuantizeConfig(faces=32),
                         KeepBudget.unlimited())
    return store


def resnet_only(source: Path, target: Path) -> Path:
    """A store with a copy of `source`'s resnet/1 alone (no ensemble)."""
    shutil.copytree(source / "resnet" / "1", target / "resnet" / "1")
    return target


def precisions(client) -> dict[str, str]:
    listing = client.get("/v1/models").json()
    return {f"{m['name']}/{v['version']}": v["precision"] for m in listing["models"]
            for v in m["versions"]}


def face_probabilities(client, model: str, version: int = 1) -> list[float]:
    response = client.post(f"/predict?model={model}&version={version}&detect=false",
                           content=FACE.read_bytes(), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == (model, version)  # the same name and version
    return list(body["faces"][0]["probabilities"].values())


def direct(folder: Path, precision: str) -> np.ndarray:
    model = OnnxModel(folder, ["CPUExecutionProvider"], 1, precision=precision)
    face = cv2.imread(str(FACE), cv2.IMREAD_GRAYSCALE)
    return model.infer(normalize(face[None], model.card.input))[0]


def test_auto_serves_the_kept_int8_graph_under_the_same_name(quantized_store):
    with running_app(quantized_store, int8="auto") as client:
        assert precisions(client) == {"cnn10/1": "fp32", "resnet/1": "int8", "ensemble/1": "mixed"}
        listed = client.get("/v1/models/resnet").json()["versions"][0]
        assert listed["int8"]["kept"] and listed["int8"]["file"] == INT8_FILENAME
        served = face_probabilities(client, "resnet")
    folder = quantized_store / "resnet" / "1"
    np.testing.assert_allclose(served, direct(folder, "int8"), atol=2e-6)
    assert np.abs(direct(folder, "int8") - direct(folder, "fp32")).max() > 1e-5  # distinguishable


def test_off_serves_fp32_whatever_the_card_says(quantized_store):
    assert Settings().int8 == "auto"  # the default
    with running_app(quantized_store, int8="off") as client:
        assert set(precisions(client).values()) == {"fp32"}
        served = face_probabilities(client, "resnet")
    np.testing.assert_allclose(served, direct(quantized_store / "resnet" / "1", "fp32"), atol=2e-6)


def test_auto_serves_fp32_where_the_card_says_not_kept(quantized_store, tmp_path):
    store = resnet_only(quantized_store, tmp_path)
    folder = store / "resnet" / "1"
    card = ModelCard.read(folder / CARD_FILENAME)
    card.int8 = card.int8.model_copy(update={"kept": False})
    card.write(folder / CARD_FILENAME)
    with running_app(store, int8="auto", ensemble="", default_model="resnet") as client:
        assert precisions(client) == {"resnet/1": "fp32"}


def test_an_old_card_without_int8_keeps_working():
    card = ModelCard.read(COMMITTED_STORE / "resnet-plain" / "2" / CARD_FILENAME)
    assert card.int8 is None
    assert "int8" not in card.model_dump(mode="json", exclude={"int8"})
    assert OnnxModel(COMMITTED_STORE / "resnet-plain" / "2", ["CPUExecutionProvider"], 1,
                     precision="auto").precision == "fp32"


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "cannot be loaded"),  # sha256 updated to match: ONNX Runtime refuses it
    ("alter", "does not match the sha256"),
    ("remove", "cannot be read"),
])
def test_a_bad_kept_int8_file_refuses_the_version_at_start_up(quantized_store, tmp_path,
                                                               damage, message):
    store = resnet_only(quantized_store, tmp_path)
    folder = store / "resnet" / "1"
    graph = folder / INT8_FILENAME
    if damage == "remove":
        graph.unlink()
    else:
        graph.write_bytes(graph.read_bytes()[:1000])
    if damage == "truncate":
        card = ModelCard.read(folder / CARD_FILENAME)
        card.int8.sha256 = hashlib.sha256(graph.read_bytes()).hexdigest()
        card.write(folder / CARD_FILENAME)
    # Another version without int8, so that the service becomes ready.
    shutil.copytree(folder, store / "resnet" / "2")
    other = ModelCard.read(folder / CARD_FILENAME).model_copy(update={"version": 2, "int8": None})
    other.write(store / "resnet" / "2" / CARD_FILENAME)
    with running_app(store, int8="auto", ensemble="", default_model="resnet") as client:
        listing = client.get("/v1/models").json()
        assert precisions(client) == {"resnet/2": "fp32"}
        failure = listing["failures"]["resnet/1"]
        assert INT8_FILENAME in failure and message in failure and "FER_INT8=off" in failure
        refused = client.post("/predict?model=resnet&version=1&detect=false",
                              content=FACE.read_bytes(), headers={"content-type": "image/png"})
        assert refused.status_code == 404 and face_probabilities(client, "resnet", version=2)
    with running_app(store, int8="off", ensemble="", default_model="resnet") as client:
        # the way out that the message names
        assert precisions(client) == {"resnet/1": "fp32", "resnet/2": "fp32"}
    with pytest.raises(ModelLoadError, match=message):
        OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="auto")


def test_a_replaced_int8_file_is_tried_again_on_the_next_scan(quantized_store, tmp_path):
    store = resnet_only(quantized_store, tmp_path)
    graph = store / "resnet" / "1" / INT8_FILENAME
    good = graph.read_bytes()
    graph.write_bytes(b"not onnx")
    models = ModelStore(store, int8="auto")
    assert models.sync().failed == ["resnet/1"]
    graph.write_bytes(good)
    later = graph.stat().st_mtime + 2  # a rewrite within the file system's time resolution
    os.utime(graph, (later, later))
    assert models.sync().loaded == ["resnet/1"]
    assert models.get("resnet").precision == "int8"


COMMITTED_INT8 = sorted(
    version
    for model in (COMMITTED_STORE.iterdir() if COMMITTED_STORE.is_dir() else [])
    if model.is_dir()
    for version in model.iterdir()
    if is_version_folder(version) and (version / INT8_FILENAME).exists()
)


def test_only_kept_int8_files_are_committed():
    for version in COMMITTED_STORE.glob("*/*"):
        if (version / INT8_FILENAME).exists():
            card = ModelCard.read(version / CARD_FILENAME)
            assert card.int8 is not None and card.int8.kept, version
            assert card.int8.drop_points <= card.int8.max_drop_points == 0.3, version
            assert card.int8.agreement_top1 >= MIN_AGREEMENT, version
            assert card.int8.validation_count == 3589, version  # measured on all of validation


def skip_unless_measured_on_this_cpu(folder: Path, monkeypatch) -> dict:
    """The card's figures for this CPU's int8 kernel family (the kernels round differently),
    with the real family restored; skips where the card has none (the service serves fp32)."""
    monkeypatch.setattr(cpu_features, "int8_kernel", lambda: REAL_KERNEL)
    measured = ModelCard.read(folder / CARD_FILENAME).int8.measurement(REAL_KERNEL)
    if measured is None or not measured["kept"]:
        pytest.skip(f"{folder} was not measured within budget on {REAL_KERNEL} int8 kernels")
    return measured


@pytest.mark.parametrize("folder", COMMITTED_INT8,
                         ids=[f"{v.parent.name}/{v.name}" for v in COMMITTED_INT8])
def test_the_committed_int8_graph_agrees_with_fp32_on_the_fixture_faces(folder: Path,
                                                                          monkeypatch):
    measured = skip_unless_measured_on_this_cpu(folder, monkeypatch)
    fp32 = OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="fp32")
    int8 = OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="auto")  # checks sha256
    assert int8.precision == "int8"
    images = [face for split in ("train", "validation")
              for face in load_split(FER_MINI, split, cache_dir=None).images]
    crops = np.stack([crop_face(face, whole_image_box(face), WHOLE_IMAGE_CROP, 48)
                      for face in images])
    batch = normalize(crops, fp32.card.input)
    reference, quantized = fp32.infer(batch), int8.infer(batch)
    agreement = float((reference.argmax(1) == quantized.argmax(1)).mean())
    # Committed: 0.99 (cnn10/4) and 0.95 (resnet/4), probabilities within 0.03 and 0.05;
    # a badly calibrated graph agrees on about 0.4 (tests/train/test_quantize.py).
    assert agreement >= 0.90 and np.abs(reference - quantized).max() <= 0.15, agreement
    # The card's own agreement, over the whole validation split, is as high.
    assert measured["agreement_top1"] >= 0.95


@pytest.mark.slow
@needs_fer2013
@pytest.mark.parametrize("folder", COMMITTED_INT8,
                         ids=[f"{v.parent.name}/{v.name}" for v in COMMITTED_INT8])
def test_the_committed_int8_cards_accuracy_is_measured_again_exactly(folder: Path, monkeypatch):
    from train.evaluate import classify_faces

    measured = skip_unless_measured_on_this_cpu(folder, monkeypatch)

    validation = load_split(SHARED_FER2013, "validation")
    int8 = OnnxModel(folder, ["CPUExecutionProvider"], 0, precision="auto")
    predictions = classify_faces([int8], validation.images).argmax(1)
    accuracy = float((predictions == validation.labels).mean())
    assert accuracy == pytest.approx(measured["validation_accuracy"], abs=6e-4)


def test_auto_keeps_fp32_on_cuda(quantized_store):
    """int8 was measured on the CPU provider only."""
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ModelStore(quantized_store, providers=cuda, int8="auto").precision == "fp32"
    assert ModelStore(quantized_store, int8="auto").precision == "auto"


def test_auto_serves_int8_only_on_kernel_families_it_was_measured_on(quantized_store, tmp_path,
                                                                      monkeypatch):
    store = resnet_only(quantized_store, tmp_path)
    folder = store / "resnet" / "1"
    assert ModelCard.read(folder / CARD_FILENAME).int8.kernel == "dot_product"
    monkeypatch.setattr(cpu_features, "int8_kernel", lambda: "avx2_u8s8")
    assert OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="auto").precision == "fp32"
    for kept, precision in ((False, "fp32"), (True, "int8")):  # as `train quantize --check` writes
        card = ModelCard.read(folder / CARD_FILENAME)
        card.int8.checks["avx2_u8s8"] = Int8Check(kept=kept, validation_accuracy=0.5)
        card.write(folder / CARD_FILENAME)
        served = OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="auto")
        assert served.precision == precision
        assert served.card.int8.measurement("avx2_u8s8")["validation_accuracy"] == 0.5
    assert OnnxModel(folder, ["CPUExecutionProvider"], 1, precision="fp32").precision == "fp32"


def test_the_int8_kernel_family_follows_the_cpu_flags():
    assert cpu_features.kernel_for(frozenset({"avx2", "avx512_vnni"}), "x86_64") == "dot_product"
    assert cpu_features.kernel_for(frozenset({"avx2", "avx_vnni"}), "x86_64") == "dot_product"
    assert cpu_features.kernel_for(frozenset({"asimd", "asimddp"}), "aarch64") == "dot_product"
    assert cpu_features.kernel_for(frozenset(), "arm64") == "dot_product"  # Apple silicon
    assert cpu_features.kernel_for(frozenset({"sse4_2", "avx2"}), "x86_64") == "avx2_u8s8"
    assert cpu_features.kernel_for(frozenset({"sse4_2"}), "x86_64") == "generic"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_features.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_vnni"}
    assert cpu_features.cpu_flags(tmp_path / "absent") == frozenset()
