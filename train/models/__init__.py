"""Registry of trainable networks: a name -> (config class, model class).

The checkpoint and the card store the name and the config fields, so any script can
rebuild the exact network with `build(name, **config)`.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from train.models.cnn10 import CNN10, CNN10Config
from train.models.resnet import ResNet, ResNetConfig

REGISTRY: dict[str, tuple[type, type[nn.Module], dict[str, Any]]] = {
    "cnn10": (CNN10Config, CNN10, {}),
    "resnet": (ResNetConfig, ResNet, {"improved": True}),
    "resnet-plain": (ResNetConfig, ResNet, {"improved": False}),
}


def config_for(name: str, **overrides: Any) -> Any:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(REGISTRY)}")
    config_cls, _, fixed = REGISTRY[name]
    known = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"{name} has no option(s) {sorted(unknown)}; known: {sorted(known)}")
    clashing = {k: v for k, v in overrides.items() if k in fixed and fixed[k] != v}
    if clashing:
        raise ValueError(f"{name} fixes {fixed}; use the other model name instead of {clashing}")
    values = {**overrides, **fixed}
    if "blocks" in values:
        values["blocks"] = tuple(values["blocks"])
    return config_cls(**values)


def build(name: str, **overrides: Any) -> nn.Module:
    config = config_for(name, **overrides)
    return REGISTRY[name][1](config)


def config_dict(name: str, **overrides: Any) -> dict[str, Any]:
    return asdict(config_for(name, **overrides))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
