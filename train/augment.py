"""On-the-fly augmentation of a whole batch at once, on the training device.

One affine warp per image (rotation, scale, shift, horizontal flip) through
`affine_grid`/`grid_sample`, then an optional random crop and random erasing.
Working on the batch tensor keeps data loading far cheaper than the network.

Before that, on the uint8 faces, `equalize_randomly` can histogram-equalise a share
(`equalize_p`) of them, with the service's own `crop_face`: the service equalises faces
detected in photos when the card says `face_crop.equalize`, so a model can be trained
on faces like those as well as on FER2013's own. Off by default. The blur, JPEG and
tone changes of real photos are `train/degrade.py`'s, configured here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from service.card import FaceCropSpec
from service.preprocess import crop_face, whole_image_box

EQUALIZE = FaceCropSpec(padding=0.0, equalize=True)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0
    scale: float = 0.1  # zoom factor drawn from [1 - scale, 1 + scale]
    shift: float = 0.1  # fraction of the side
    hflip: bool = True
    crop: int | None = None  # random crop side; None keeps the full image
    erase_p: float = 0.25  # probability of erasing one random rectangle
    erase_area: tuple[float, float] = (0.02, 0.2)
    equalize_p: float = 0.0  # probability of histogram-equalising a face (equalize_randomly)
    # Real-photo degradations (train/degrade.py), each with its own probability, off by default.
    tone_p: float = 0.0  # probability of another brightness and contrast
    brightness: float = 0.2  # offset drawn from [-b, b] x 255
    contrast: float = 0.3  # gain about the face's mean drawn from [1 - c, 1 + c]
    blur_p: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.4, 1.2)  # its sigma in pixels of the 48 px face
    jpeg_p: float = 0.0  # probability of a JPEG round trip
    jpeg_quality: tuple[float, float] = (20, 80)

    def __post_init__(self) -> None:
        for name in ("erase_p", "equalize_p", "tone_p", "blur_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augmentation {name}={getattr(self, name)} is not a probability")
        for name, low, high in (("erase_area", 0.0, 1.0), ("blur_sigma", 0.01, 10.0),
                                ("jpeg_quality", 1, 100)):
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ValueError(f"augmentation {name}={value!r} is not a [low, high] pair")
            first, last = value
            if not low <= first <= last <= high:
                raise ValueError(
                    f"augmentation {name}={[first, last]} is not a range within [{low}, {high}]")
        if not 0.0 <= self.contrast < 1.0 or not 0.0 <= self.brightness <= 1.0:
            raise ValueError(f"augmentation contrast={self.contrast} must lie in [0, 1) and "
                             f"brightness={self.brightness} in [0, 1]")


def augment_config(options: dict) -> AugmentConfig:
    """`AugmentConfig` from `--aug` options, an unknown name refused with the known ones."""
    known = {f.name for f in fields(AugmentConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return AugmentConfig(**options)


def equalize_randomly(faces: np.ndarray, p: float, generator: torch.Generator) -> np.ndarray:
    """uint8 faces [N, S, S], each histogram-equalised with probability `p` as the
    service equalises a detected face (`crop_face` with `face_crop.equalize`).

    With `p == 0` the faces come back as they are and `generator` is not used, so runs
    without it draw the same random numbers as before it existed."""
    if p <= 0 or len(faces) == 0:
        return faces
    chosen = (torch.rand(len(faces), generator=generator) < p).numpy()
    if not chosen.any():
        return faces
    out = faces.copy()
    for index in np.flatnonzero(chosen):
        face = faces[index]
        out[index] = crop_face(face, whole_image_box(face), EQUALIZE, face.shape[0])
    return out


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine + flip (+ crop, + erasing) of an NCHW float batch."""
    n = batch.shape[0]
    device = batch.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(device) * (high - low) + low

    angle = uniform(-config.rotation_deg, config.rotation_deg) * (math.pi / 180.0)
    zoom = uniform(1.0 - config.scale, 1.0 + config.scale)
    flip = torch.ones(n, device=device)
    if config.hflip:
        flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-config.shift, config.shift) * 2], dim=1),
            torch.stack([sin * flip, cos, uniform(-config.shift, config.shift) * 2], dim=1),
        ],
        dim=1,
    ).to(batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if config.crop is not None and config.crop < out.shape[-1]:
        out = _random_crop(out, config.crop, generator)
    if config.erase_p > 0:
        out = _random_erase(out, config, generator)
    return out.contiguous()


def _random_crop(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    n, _, height, width = batch.shape
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(size)[None, :]).to(batch.device)  # [n, size]
    cols = (left[:, None] + torch.arange(size)[None, :]).to(batch.device)
    index = torch.arange(n, device=batch.device)[:, None, None]
    return batch[:, 0][index, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _random_erase(
    batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    n, _, height, width = batch.shape
    area = torch.empty(n).uniform_(*config.erase_area, generator=generator) * height * width
    aspect = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=generator))
    erase_h = torch.sqrt(area * aspect).clamp(1, height).long()
    erase_w = torch.sqrt(area / aspect).clamp(1, width).long()
    top = (torch.rand(n, generator=generator) * (height - erase_h + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - erase_w + 1)).long()
    chosen = torch.rand(n, generator=generator) < config.erase_p
    ys = torch.arange(height)[None, :]
    xs = torch.arange(width)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + erase_h)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + erase_w)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]).to(batch.device)
    noise = torch.randn(batch.shape, generator=generator).to(batch.device, batch.dtype)
    return torch.where(mask[:, None], noise, batch)
