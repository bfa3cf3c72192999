"""What real photos do to a face and FER2013's faces lack: blur, JPEG artefacts, and
other brightness and contrast.

A face the service cuts out of a photo or a webcam frame has been through a lens that
was not quite in focus, a JPEG encoder, and lighting FER2013's curated crops rarely
show; a small face is also enlarged to 48x48, which softens it further.
`degrade_randomly` gives a share of the training faces each of these, on the uint8
faces before normalisation, in the order a camera applies them (tone, blur, JPEG). Each
kind has its own probability in `AugmentConfig` (`tone_p`, `blur_p`, `jpeg_p`), all off
by default; with all three at 0 nothing is drawn from the generator, so runs without
them see the same random stream as before they existed.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from train.augment import AugmentConfig


def degrades(config: AugmentConfig) -> bool:
    return config.tone_p > 0 or config.blur_p > 0 or config.jpeg_p > 0


def degrade_randomly(
    faces: np.ndarray, config: AugmentConfig, generator: torch.Generator
) -> np.ndarray:
    """uint8 faces [N, S, S]; each kind of degradation hits a face with its probability.

    The input is left alone; the result is a new array (or `faces` itself when nothing
    is configured)."""
    if not degrades(config) or len(faces) == 0:
        return faces
    n = len(faces)

    def uniform(low: float, high: float) -> np.ndarray:
        return (torch.rand(n, generator=generator) * (high - low) + low).numpy()

    # Every draw happens whatever is chosen, so one kind's probability does not shift
    # another kind's random numbers.
    tone_chosen = uniform(0, 1) < config.tone_p
    gain = uniform(1 - config.contrast, 1 + config.contrast)
    offset = uniform(-config.brightness, config.brightness) * 255
    blur_chosen = uniform(0, 1) < config.blur_p
    sigma = uniform(*config.blur_sigma)
    jpeg_chosen = uniform(0, 1) < config.jpeg_p
    quality = np.rint(uniform(*config.jpeg_quality)).astype(int)

    out = faces.copy()
    for i in np.flatnonzero(tone_chosen | blur_chosen | jpeg_chosen):
        face = out[i]
        if tone_chosen[i]:
            face = change_tone(face, float(gain[i]), float(offset[i]))
        if blur_chosen[i]:
            face = cv2.GaussianBlur(face, (0, 0), sigmaX=float(sigma[i]))
        if jpeg_chosen[i]:
            face = jpeg_round_trip(face, int(quality[i]))
        out[i] = face
    return out


def change_tone(face: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Contrast about the face's own mean, then a brightness offset, clipped to uint8."""
    mean = float(face.mean())
    toned = (face.astype(np.float32) - mean) * gain + mean + offset
    return np.clip(np.rint(toned), 0, 255).astype(np.uint8)


def jpeg_round_trip(face: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality}")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
