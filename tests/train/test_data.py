import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.card import CLASSES
from tests.conftest import FER_MINI, SHARED_FER2013, needs_fer2013
from train.data import DatasetError, Split, load_split


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerows(rows)
    return path


def csv_from_folder(path: Path) -> Path:
    rows = []
    for split, usage in (("train", "Training"), ("validation", "PublicTest")):
        data = load_split(FER_MINI, split, cache_dir=None)
        for image, label in zip(data.images, data.labels, strict=True):
            rows.append((str(label), " ".join(map(str, image.ravel())), usage))
    return write_csv(path, rows)


def test_folder_form_loads_with_fer2013_label_indices():
    data = load_split(FER_MINI, "train", cache_dir=None)
    assert data.images.shape[1:] == (48, 48) and data.images.dtype == np.uint8
    assert data.class_counts() == dict.fromkeys(CLASSES, 12)
    happy = sorted((FER_MINI / "train" / "happy").iterdir())[0]
    index = int(np.flatnonzero(data.labels == CLASSES.index("happy"))[0])
    np.testing.assert_array_equal(data.images[index], cv2.imread(str(happy), cv2.IMREAD_GRAYSCALE))


def test_csv_form_gives_the_same_arrays_as_the_folder_form(tmp_path):
    path = csv_from_folder(tmp_path / "fer2013.csv")
    for split in ("train", "validation"):
        from_csv = load_split(path, split, cache_dir=None)
        from_folder = load_split(FER_MINI, split, cache_dir=None)
        assert from_csv.fingerprint() == from_folder.fingerprint()


def test_decoded_splits_are_cached_and_reused(tmp_path):
    first = load_split(FER_MINI, "validation", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    assert (load_split(FER_MINI, "validation", cache_dir=tmp_path).fingerprint()
            == first.fingerprint())
    assert list(tmp_path.glob("*.npz")) == [cached]


def test_subset_is_class_balanced():
    data = load_split(FER_MINI, "train", cache_dir=None).subset(3)
    assert set(data.class_counts().values()) == {3}


@pytest.mark.parametrize("row,message", [
    (("3", "1 2 3", "Training"), "2304"),
    (("9", " ".join(["0"] * 2304), "Training"), "emotion 9"),
    (("x", " ".join(["0"] * 2304), "Training"), "malformed"),
    (("3", " ".join(["300"] * 2304), "Training"), "0..255"),
])
def test_malformed_csv_rows_are_named_with_their_line(tmp_path, row, message):
    path = write_csv(tmp_path / "bad.csv", [row])
    with pytest.raises(DatasetError, match=message) as caught:
        load_split(path, "train", cache_dir=None)
    assert ":2:" in str(caught.value)


def test_csv_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="lacks the column"):
        load_split(path, "train", cache_dir=None)


def test_csv_without_the_split_is_refused(tmp_path):
    path = write_csv(tmp_path / "f.csv", [("3", " ".join(["0"] * 2304), "Training")])
    with pytest.raises(DatasetError, match="PrivateTest"):
        load_split(path, "test", cache_dir=None)


def test_wrong_path_split_size_and_class_folder_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_split(tmp_path / "absent", "train")
    with pytest.raises(DatasetError, match="unknown split"):
        load_split(FER_MINI, "holdout")
    with pytest.raises(DatasetError, match="no folder for split"):
        load_split(tmp_path, "train")
    (tmp_path / "train" / "happy").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "train" / "happy" / "a.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match="expected 48x48"):
        load_split(tmp_path, "train", cache_dir=None)
    (tmp_path / "train" / "happy" / "a.png").unlink()
    (tmp_path / "train" / "joy").mkdir()
    with pytest.raises(DatasetError, match="unknown class folder"):
        load_split(tmp_path, "train", cache_dir=None)


def test_split_checks_its_arrays():
    with pytest.raises(DatasetError):
        Split(np.zeros((2, 32, 32), np.uint8), np.zeros(2, np.int64))


@needs_fer2013
def test_the_real_dataset_has_fer2013s_sizes():
    assert len(load_split(SHARED_FER2013, "train")) == 28_709
    validation = load_split(SHARED_FER2013, "validation")
    assert len(validation) == 3_589 and validation.class_counts()["disgust"] == 56


def test_runs_started_together_share_one_cache_without_clashing(tmp_path, monkeypatch):
    """Two trainings started at once both fill the cache; neither may trip over the other's file."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    both_written = threading.Barrier(2, timeout=10)
    savez = np.savez

    def savez_then_wait(*args, **kwargs):
        savez(*args, **kwargs)
        both_written.wait()  # both writers finish writing before either moves its file into place

    monkeypatch.setattr(np, "savez", savez_then_wait)
    with ThreadPoolExecutor(2) as pool:
        loads = list(pool.map(lambda _: load_split(FER_MINI, "train", cache_dir=tmp_path),
                              range(2)))
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]
    cached = load_split(FER_MINI, "train", cache_dir=tmp_path)
    for data in loads:
        np.testing.assert_array_equal(data.images, cached.images)
        np.testing.assert_array_equal(data.labels, cached.labels)


def test_packed_form_gives_the_same_arrays_as_the_folder_form(tmp_path):
    from train.data import pack_splits

    packed = pack_splits(FER_MINI, tmp_path / "fer2013.npz.xz", ("train", "validation"))
    for split in ("train", "validation"):
        from_packed = load_split(packed, split, cache_dir=tmp_path / "cache")
        assert (from_packed.fingerprint()
                == load_split(FER_MINI, split, cache_dir=None).fingerprint())
    with pytest.raises(DatasetError, match="holds no 'test' split"):
        load_split(packed, "test", cache_dir=None)


def test_a_packed_file_that_is_not_one_is_refused(tmp_path):
    from train.data import pack_splits

    broken = tmp_path / "broken.npz.xz"
    broken.write_bytes(b"not lzma")
    with pytest.raises(DatasetError, match="not a packed FER2013 file"):
        load_split(broken, "train", cache_dir=None)
    with pytest.raises(DatasetError, match="ends with .npz.xz"):
        pack_splits(FER_MINI, tmp_path / "fer2013.npz", ("train",))
    with pytest.raises(DatasetError, match="no split to pack"):
        pack_splits(FER_MINI, tmp_path / "fer2013.npz.xz", ())
