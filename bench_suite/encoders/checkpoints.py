"""Local checkpoints of self-supervised models in their official release formats: find the file, read it,
unwrap it to a plain backbone state dict.

The DINO, iBOT and DINO-ResNet releases share one shape: either a plain state dict (the "backbone only"
downloads), or a training checkpoint that wraps it as {"teacher": ..., "student": ...} (or "state_dict" /
"model") with "module." / "backbone." prefixes and a projection head. The teacher is preferred (DINO and
iBOT evaluate the teacher). Nothing is ever downloaded here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_suite.encoders import assets
from bench_suite.errors import CorruptDataError, MissingDataError

WRAPPERS = ("teacher", "student", "state_dict", "model")
PREFIXES = ("module.", "backbone.")


def locate(weights, cache_dir, checkpoint: str, what: str, url: str) -> Path:
    """The checkpoint file: ``weights`` (a path; a bare relative name not found in the working directory is
    looked up in the cache folder), else ``<cache>/<checkpoint>``."""
    root = assets.cache_root(cache_dir)
    if weights is None:
        path = root / checkpoint
    else:
        path = Path(weights).expanduser()
        if not path.is_absolute() and not path.exists() and (root / path).is_file():
            path = root / path
    if not path.is_file():
        raise MissingDataError(f"{what} checkpoint not found: {path}; download {checkpoint} ({url}) and pass its "
                               f"path as weights= (--weights), or put it at {root / checkpoint}")
    return path


def read_checkpoint(path: Path, what: str) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # training checkpoints also pickle their argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptDataError(f"cannot read {what} checkpoint {path}: {str(exc).splitlines()[0]}") from exc


def backbone_state(obj: dict, path: Path, drop: tuple[str, ...] = ("head.",)) -> dict[str, torch.Tensor]:
    """Unwrap teacher/student/state_dict/model, strip module./backbone. prefixes, drop keys starting with
    ``drop`` (projection heads, classifiers, iBOT's mask token)."""
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in WRAPPERS if k in obj), None)
        if key is None:
            raise CorruptDataError(f"{path}: no state dict found (top-level keys {sorted(obj)[:8]})")
        obj = obj[key]
    out = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        if not key.startswith(drop):
            out[key] = value.float()
    return out


def provenance(path: Path, how: str, note: str) -> dict:
    """The encoder ``meta`` of a checkpoint-loaded model: its file and sha256 (part of feature fingerprints)."""
    return {"weights": {"source": how, "file": path.name, "sha256": assets.sha256_file(path)},
            "note": note.format(source=f"{how} {path.name}")}
