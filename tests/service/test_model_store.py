import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.card import CARD_FILENAME, MODEL_FILENAME
from service.model_store import (
    ENSEMBLE_NAME,
    ModelNotLoaded,
    ModelStore,
    UnknownModel,
    UnknownVersion,
    is_version_folder,
    select_versions,
)


def copy_version(source: Path, store: Path, name: str, version: int) -> Path:
    """Copy a built model into `store` as name/version, fixing its card to match."""
    folder = store / name / str(version)
    shutil.copytree(source, folder)
    card = json.loads((folder / CARD_FILENAME).read_text())
    card.update(name=name, version=version)
    (folder / CARD_FILENAME).write_text(json.dumps(card))
    return folder


@pytest.fixture
def store_dir(tmp_path: Path, model_store: Path) -> Path:
    copy_version(model_store / "cnn10" / "1", tmp_path, "cnn10", 1)
    copy_version(model_store / "cnn10" / "1", tmp_path, "cnn10", 2)
    copy_version(model_store / "resnet" / "1", tmp_path, "resnet", 1)
    return tmp_path


def test_version_folders_follow_triton_rules(tmp_path):
    for name in ("1", "12", "01", "v2", "0", "²", "١", "1²", "１"):
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in tmp_path.iterdir() if is_version_folder(p)) == ["1", "12"]


def test_a_folder_named_with_unicode_digits_stops_nothing(store_dir):
    """"²".isdigit() is true and int("²") raises: such a folder must be ignored."""
    for name in ("²", "١", "³"):
        (store_dir / "cnn10" / name).mkdir()
    store = ModelStore(store_dir)
    result = store.sync()
    assert sorted(result.loaded) == ["cnn10/1", "cnn10/2", "resnet/1"] and not result.failed


FOLDER_NAMES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12
).filter(lambda name: name not in (".", "..") and len(name.encode()) <= 255)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_names=st.lists(FOLDER_NAMES, max_size=3),
       version_names=st.lists(FOLDER_NAMES, max_size=4))
@example(model_names=[], version_names=["²"])
@example(model_names=["resnet", " "], version_names=["1", "07", "١", "9" * 40])
def test_any_folder_names_leave_the_good_versions_loading(tmp_path_factory, model_store,
                                                          model_names, version_names):
    root = tmp_path_factory.mktemp("fuzzed")
    copy_version(model_store / "cnn10" / "1", root, "cnn10", 1)
    for name in version_names:
        (root / "cnn10" / name).mkdir(exist_ok=True)
    for name in model_names:
        (root / name).mkdir(exist_ok=True)
        for version in version_names:
            (root / name / version).mkdir(exist_ok=True)  # a version folder with no files
    store = ModelStore(root)
    result = store.sync()  # never raises
    assert "cnn10/1" in result.loaded and store.get("cnn10", 1).version == 1
    for key in result.failed:  # only real version folders are tried, and they lack files
        name, version = key.rsplit("/", 1)
        assert version.isascii() and version.isdigit() and not version.startswith("0")
        assert "no model.json" in store.failures[key]


def test_a_configured_model_not_loaded_yet_is_not_unknown(store_dir):
    store = ModelStore(store_dir, ensemble_members=["cnn10", "resnet"])  # not synced yet
    for name in ("cnn10", "resnet", ENSEMBLE_NAME):
        with pytest.raises(ModelNotLoaded) as raised:
            store.resolve(name)
        assert (raised.value.status, raised.value.retry_after_s) == (503, 1)
    with pytest.raises(UnknownModel) as raised:
        store.resolve("vgg")
    assert raised.value.status == 404
    with pytest.raises(UnknownVersion):
        store.resolve(ENSEMBLE_NAME, 2)  # never exists, loaded or not
    store.sync()
    assert store.resolve("cnn10").version == 2


@pytest.mark.parametrize(
    "policy,expected", [("all", [1, 2, 5]), ("latest", [5]), ("2,5", [2, 5]), ("3", [])]
)
def test_version_policies(policy, expected):
    assert select_versions([5, 1, 2], policy) == expected


def test_loads_every_version_and_latest_is_the_highest(store_dir):
    store = ModelStore(store_dir, ensemble_members=["cnn10", "resnet"])
    result = store.sync()
    assert sorted(result.loaded) == ["cnn10/1", "cnn10/2", "resnet/1"]
    assert store.get("cnn10").version == 2
    assert store.get("cnn10", 1).version == 1
    assert store.names() == ["cnn10", "resnet", ENSEMBLE_NAME]
    ensemble = store.resolve(ENSEMBLE_NAME)
    assert [(m.name, m.version) for m in ensemble.members] == [("cnn10", 2), ("resnet", 1)]


def test_ensemble_members_can_pin_versions(store_dir):
    store = ModelStore(store_dir, ensemble_members=["cnn10:1", "cnn10:2", "resnet"])
    store.sync()
    ensemble = store.resolve(ENSEMBLE_NAME)
    assert [(m.name, m.version) for m in ensemble.members] == [
        ("cnn10", 1), ("cnn10", 2), ("resnet", 1)]
    missing = ModelStore(store_dir, ensemble_members=["cnn10:3", "resnet"])
    missing.sync()
    assert ENSEMBLE_NAME not in missing.names()
    with pytest.raises(ModelNotLoaded, match="cnn10:3"):  # configured: 503, not 404
        missing.resolve(ENSEMBLE_NAME)


@pytest.mark.parametrize("member,message", [
    ("cnn10:x", "version must be a number"), ("cnn10:0", "version must be a number"),
    ("cnn10:-1", "version must be a number"), ("cnn10:²", "version must be a number"),
    ("cnn10:١", "version must be a number"), (":2", "model name is missing")])
def test_a_malformed_pinned_member_is_a_settings_error(member, message):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(ensemble=f"{member},resnet")


def test_latest_policy_loads_only_the_highest(store_dir):
    store = ModelStore(store_dir, policy="latest")
    store.sync()
    assert sorted(store.models["cnn10"]) == [2]


def test_unknown_model_and_version_raise(store_dir):
    store = ModelStore(store_dir)
    store.sync()
    with pytest.raises(UnknownModel):
        store.get("vgg")
    with pytest.raises(UnknownVersion):
        store.get("cnn10", 9)
    with pytest.raises(UnknownModel):
        ModelStore(store_dir, ensemble_members=[]).resolve(ENSEMBLE_NAME)  # no ensemble


def test_corrupt_and_incompatible_versions_are_refused_without_stopping_the_others(store_dir):
    corrupt = copy_version(store_dir / "cnn10" / "1", store_dir, "cnn10", 3)
    (corrupt / MODEL_FILENAME).write_bytes(b"this is not an onnx graph")
    wrong_card = copy_version(store_dir / "cnn10" / "1", store_dir, "cnn10", 4)
    card = json.loads((wrong_card / CARD_FILENAME).read_text())
    card["classes"] = ["happy", "sad"]
    (wrong_card / CARD_FILENAME).write_text(json.dumps(card))
    mislabelled = copy_version(store_dir / "cnn10" / "1", store_dir, "cnn10", 5)
    card = json.loads((mislabelled / CARD_FILENAME).read_text())
    card["input"]["size"] = 64  # the graph takes 48x48
    (mislabelled / CARD_FILENAME).write_text(json.dumps(card))
    no_card = copy_version(store_dir / "cnn10" / "1", store_dir, "cnn10", 6)
    (no_card / CARD_FILENAME).unlink()

    store = ModelStore(store_dir)
    result = store.sync()
    assert sorted(result.failed) == ["cnn10/3", "cnn10/4", "cnn10/5", "cnn10/6"]
    assert "cannot be loaded" in store.failures["cnn10/3"]
    assert "classes" in store.failures["cnn10/4"]
    assert "shape" in store.failures["cnn10/5"]
    assert "no model.json" in store.failures["cnn10/6"]
    assert sorted(store.models["cnn10"]) == [1, 2]
    assert store.get("cnn10").version == 2  # latest that loaded
    assert store.sync().failed == []  # unchanged failures are not retried on every poll


def test_sync_picks_up_new_and_removed_versions(store_dir):
    store = ModelStore(store_dir)
    store.sync()
    copy_version(store_dir / "cnn10" / "1", store_dir, "cnn10", 7)
    shutil.rmtree(store_dir / "cnn10" / "1")
    result = store.sync()
    assert result.loaded == ["cnn10/7"] and result.unloaded == ["cnn10/1"]
    assert sorted(store.models["cnn10"]) == [2, 7]


def test_missing_store_loads_nothing(tmp_path):
    store = ModelStore(tmp_path / "absent")
    assert store.sync().loaded == [] and store.loaded_count() == 0
