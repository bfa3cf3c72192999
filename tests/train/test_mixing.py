"""train/mixing.py: mixup and cutmix blends, their labels' weights, and the mixed loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FER_MINI
from train.data import load_split
from train.mixing import MixedBatch, check_mix, mix_batch, mixed_correct, mixed_cross_entropy


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split(FER_MINI, "train", cache_dir=None)
    images = torch.from_numpy(split.images[:32].astype(np.float32) / 255.0)[:, None]
    return images, torch.from_numpy(split.labels[:32])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_none_returns_the_batch_untouched_and_draws_nothing(faces):
    images, labels = faces
    generator = seeded()
    batch = mix_batch(images, labels, "none", 1.0, generator)
    assert batch.images is images and batch.lam == 1.0
    assert torch.equal(batch.labels_a, batch.labels_b)
    assert torch.equal(generator.get_state(), seeded().get_state())


def test_mixup_is_the_weighted_blend_of_each_face_and_its_partner(faces):
    images, labels = faces
    batch = mix_batch(images, labels, "mixup", 0.4, seeded(1))
    assert 0.0 < batch.lam < 1.0
    # Recover each partner from the blend and check it is a face of the batch.
    recovered = (batch.images - batch.lam * images) / (1.0 - batch.lam)
    distances = torch.cdist(recovered.flatten(1), images.flatten(1))
    assert distances.min(dim=1).values.max() < 0.1  # others lie ~15 away (cdist rounds)
    assert torch.equal(labels[distances.argmin(dim=1)], batch.labels_b)


def test_cutmix_pastes_one_rectangle_and_lam_is_the_share_left(faces):
    images, labels = faces
    batch = mix_batch(images, labels, "cutmix", 1.0, seeded(2))
    changed = (batch.images != images).any(dim=0)[0]  # [H, W], over the batch
    rows, cols = torch.nonzero(changed, as_tuple=True)
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.9  # one solid rectangle (a few pixels may coincide)
    pasted = box.numel() / changed.numel()
    assert batch.lam == pytest.approx(1.0 - pasted, abs=1e-6)


def test_the_same_seed_gives_the_same_mix(faces):
    images, labels = faces
    for kind in ("mixup", "cutmix"):
        a, b = (mix_batch(images, labels, kind, 1.0, seeded(5)) for _ in range(2))
        assert torch.equal(a.images, b.images) and a.lam == b.lam
        assert not torch.equal(a.images, mix_batch(images, labels, kind, 1.0, seeded(6)).images)


def test_the_mixed_loss_weights_the_two_labels_by_lam():
    logits = torch.randn(8, 7)
    a, b = torch.randint(0, 7, (8,)), torch.randint(0, 7, (8,))
    batch = MixedBatch(torch.zeros(8, 1, 4, 4), a, b, 0.3)
    expected = 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b)
    torch.testing.assert_close(mixed_cross_entropy(logits, batch), expected)
    assert mixed_correct(logits, MixedBatch(batch.images, a, a, 1.0)) == (
        logits.argmax(1) == a).sum().item()


@pytest.mark.parametrize("kind,alpha", [("blend", 1.0), ("mixup", 0.0), ("cutmix", -1.0)])
def test_a_bad_kind_or_alpha_is_refused(kind, alpha):
    with pytest.raises(ValueError):
        check_mix(kind, alpha)
