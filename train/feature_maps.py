"""`python -m train feature-maps`: the first paper's figure 2, every conv layer's maps.

The image is a 48x48 face, or a photo whose largest Haar face is cropped the way the
service crops it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.card import FaceCropSpec, InputSpec
from service.detector import FaceDetector
from service.imaging import decode_grayscale
from service.preprocess import crop_face, normalize
from train.export import load_checkpoint


def face_from_image(path: Path, size: int, crop: FaceCropSpec) -> np.ndarray:
    gray = decode_grayscale(path.read_bytes(), max_pixels=100_000_000)
    if gray.shape == (size, size):
        return gray
    boxes = FaceDetector().detect(gray)
    if not boxes:
        raise SystemExit(f"no face found in {path}; pass a {size}x{size} face crop instead")
    return crop_face(gray, boxes[0], crop, size)


def conv_activations(model: nn.Module, batch: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(layer name, output [C, H, W]) of every Conv2d, in forward order."""
    captured: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.append((name, out[0].detach()))
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def save_feature_maps(face: np.ndarray, spec: InputSpec, model: nn.Module, out: Path,
                      maps_per_layer: int = 16, title: str = "") -> int:
    """Write the grid PNG; returns how many conv layers it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = conv_activations(model, torch.from_numpy(normalize(face[None], spec)))
    rows = len(layers) + 1
    fig, axes = plt.subplots(rows, maps_per_layer, figsize=(maps_per_layer * 0.9, rows * 1.0),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(face, cmap="gray")
    axes[0][0].set_title("input", fontsize=7)
    for row, (name, maps) in enumerate(layers, start=1):
        for column in range(min(maps_per_layer, maps.shape[0])):
            axes[row][column].imshow(maps[column].float().numpy(), cmap="viridis")
        axes[row][0].set_title(f"{name} {tuple(maps.shape)}", fontsize=6, loc="left")
    fig.suptitle(title or "feature maps of every conv layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return len(layers)


def main(args: argparse.Namespace) -> None:
    model, checkpoint = load_checkpoint(Path(args.checkpoint))
    spec = InputSpec(**checkpoint["input_spec"])
    face = face_from_image(Path(args.image), spec.size, FaceCropSpec())
    count = save_feature_maps(face, spec, model, Path(args.out), args.maps,
                              title=f"{checkpoint['model_name']}: {Path(args.image).name}")
    print(f"wrote {args.out} ({count} conv layers)")
