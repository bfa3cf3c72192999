"""A small kustomize, enough for deploy/k8s: the tests render with it where kubectl is absent.

It does what our kustomizations use, in kustomize's order: `resources` (files and other
kustomization folders), `configMapGenerator` (`envs`, `literals`, `behavior: merge`),
strategic-merge `patches` by `path`, `labels` (metadata only), `images`; then, once for
the whole build, the content-hash suffix of generated ConfigMaps and the references to
them. Anything else in a kustomization is refused rather than silently ignored. Where
kubectl is installed, tests/deploy/test_k8s.py checks that it renders the same objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "labels", "images"}
GENERATED = "fer.test/generated"  # internal marker, removed before returning


class UnsupportedKustomization(ValueError):
    pass


def build(folder: Path) -> list[Resource]:
    """The objects `kubectl kustomize folder` prints."""
    resources = _build(Path(folder))
    renames = {}
    for resource in resources:
        if resource["metadata"].pop(GENERATED, False):
            name = resource["metadata"]["name"]
            renames[name] = f"{name}-{config_map_hash(resource)}"
            resource["metadata"]["name"] = renames[name]
    for resource in resources:
        _rename_config_map_refs(resource, renames)
    return resources


def config_map_hash(config_map: Resource) -> str:
    """kustomize's name suffix: the first 10 hex digits of the sha256 of the Go JSON of
    kind, name and data, with 0, 1, 3, a, e spelled g, h, k, m, t. kustomize 5 looks the
    name up as one key "metadata/name", finds none and hashes "" (api/hasher/hasher.go)."""
    encoded = {"kind": "ConfigMap", "name": "", "data": config_map.get("data", {})}
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _build(folder: Path) -> list[Resource]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{folder}: {sorted(unknown)} not supported here")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            resources += _build(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        _generate_config_map(folder, generator, resources)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"{folder}: only `patches: - path:` is supported")
        _apply_patch(resources, yaml.safe_load((folder / patch["path"]).read_text()))
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise UnsupportedKustomization(f"{folder}: labels reach metadata only here")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    return resources


def _generate_config_map(
    folder: Path, generator: dict[str, Any], resources: list[Resource]
) -> None:
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        for line in (folder / env_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    name = generator["name"]
    behavior = generator.get("behavior", "create")
    existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name]
    if behavior == "merge":
        if not existing:
            raise UnsupportedKustomization(f"{folder}: no ConfigMap {name} to merge into")
        existing[0].setdefault("data", {}).update(data)
        return
    if behavior != "create" or existing:
        raise UnsupportedKustomization(f"{folder}: configMapGenerator {name} ({behavior})")
    resources.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, GENERATED: True},
            "data": data,
        }
    )


def _apply_patch(resources: list[Resource], patch: Resource) -> None:
    for resource in resources:
        if (resource["kind"], resource["metadata"]["name"]) == (
            patch["kind"],
            patch["metadata"]["name"],
        ):
            merged = strategic_merge(resource, patch)
            resource.clear()
            resource.update(merged)
            return
    raise UnsupportedKustomization(
        f"patch target {patch['kind']}/{patch['metadata']['name']} absent"
    )


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key; lists of named maps (containers, env, ...) merge by name;
    other lists (tolerations, args) are replaced, as Kubernetes' patch strategies say."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged)}
        for item in patch:
            if item["name"] in index:
                merged[index[item["name"]]] = strategic_merge(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _pod_spec(resource: Resource) -> dict[str, Any] | None:
    if resource["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return resource["spec"]["template"]["spec"]
    return None


def _set_image(resource: Resource, image: dict[str, str]) -> None:
    pod = _pod_spec(resource)
    for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def _rename_config_map_refs(resource: Resource, renames: dict[str, str]) -> None:
    pod = _pod_spec(resource)
    if pod is None:
        return
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and ref["name"] in renames:
                ref["name"] = renames[ref["name"]]
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref["name"] in renames:
                ref["name"] = renames[ref["name"]]
    for volume in pod.get("volumes", []):
        ref = volume.get("configMap")
        if ref and ref["name"] in renames:
            ref["name"] = renames[ref["name"]]
