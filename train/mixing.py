"""Mixup and CutMix: train on blends of two faces against the blend of their labels.

Both pair every face of a batch with another face of the same batch (a random
permutation) and draw one mixing weight `lam ~ Beta(alpha, alpha)` per batch:

- mixup blends the pixels, `lam * a + (1 - lam) * b`;
- cutmix pastes a rectangle of `b` covering `1 - lam` of the face into `a`, and then
  sets `lam` to the share of `a` that is really left once the box is clipped.

The loss is `lam * CE(logits, label_a) + (1 - lam) * CE(logits, label_b)`
(`mixed_cross_entropy`). `kind="none"` returns the batch untouched and draws nothing
from the generator, so runs without mixing keep the random stream they always had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIX_KINDS = ("none", "mixup", "cutmix")


@dataclass(frozen=True)
class MixedBatch:
    images: torch.Tensor
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    lam: float  # weight of labels_a in the loss


def check_mix(kind: str, alpha: float) -> None:
    if kind not in MIX_KINDS:
        raise ValueError(f"mix {kind!r} is not one of {', '.join(MIX_KINDS)}")
    if kind != "none" and not alpha > 0:
        raise ValueError(f"mix_alpha must be > 0 for {kind}, got {alpha}")


def mix_batch(images: torch.Tensor, labels: torch.Tensor, kind: str, alpha: float,
              generator: torch.Generator) -> MixedBatch:
    """Mix an NCHW batch with a shuffled copy of itself (see the module docstring)."""
    check_mix(kind, alpha)
    if kind == "none" or len(images) < 2:
        return MixedBatch(images, labels, labels, 1.0)
    # torch's Beta sampler takes no generator; a numpy one seeded from it keeps runs
    # reproducible from the run's seed.
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha))
    partner = torch.randperm(len(images), generator=generator).to(images.device)
    if kind == "mixup":
        mixed = lam * images + (1.0 - lam) * images[partner]
    else:
        mixed, lam = _cutmix(images, images[partner], lam, rng)
    return MixedBatch(mixed, labels, labels[partner], lam)


def _cutmix(images: torch.Tensor, others: torch.Tensor, lam: float,
            rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    height, width = images.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    box_h, box_w = int(round(height * cut)), int(round(width * cut))
    centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + (box_h + 1) // 2, height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + (box_w + 1) // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = others[..., top:bottom, left:right]
    pasted = (bottom - top) * (right - left)
    return mixed, 1.0 - pasted / float(height * width)


def mixed_cross_entropy(logits: torch.Tensor, batch: MixedBatch,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    loss_a = F.cross_entropy(logits, batch.labels_a, label_smoothing=label_smoothing)
    if batch.lam >= 1.0:
        return loss_a
    loss_b = F.cross_entropy(logits, batch.labels_b, label_smoothing=label_smoothing)
    return batch.lam * loss_a + (1.0 - batch.lam) * loss_b


def mixed_correct(logits: torch.Tensor, batch: MixedBatch) -> float:
    """Correct predictions, each label counted with its weight in the blend."""
    predicted = logits.argmax(1)
    return (batch.lam * (predicted == batch.labels_a).sum().item()
            + (1.0 - batch.lam) * (predicted == batch.labels_b).sum().item())
