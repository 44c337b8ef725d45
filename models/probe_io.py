"""Save and restore a trained probe head: Orbax for the weights, a JSON file for everything else.

Layout of a probe directory:

    probe.json    {"probe_config": {...}, "meta": {...}}  (model, layer, bins, data, metrics)
    params/       Orbax checkpoint of the ProbeHead's parameters (f32)

The probe is small (d_model*512 + 512*K floats), so shipped ones live in the repository (found by
jtrail/shipped.py). It is restored against a freshly built abstract head on the current default
device, so a probe trained on a GPU loads on a CPU and the other way round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .errors import JtrailError
from .probe import ProbeConfig, ProbeHead

META_FILE = "probe.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class ProbeFileError(JtrailError, ValueError):
    """A probe directory that is missing, incomplete or inconsistent with its metadata."""


def probe_config_to_dict(cfg: ProbeConfig) -> dict[str, Any]:
    return {"d_model": cfg.d_model, "layer": cfg.layer, "bin_edges": [float(e) for e in cfg.bin_edges],
            "hidden": cfg.hidden, "last_bin_value": cfg.last_bin_value}


def probe_config_from_dict(d: dict[str, Any]) -> ProbeConfig:
    try:
        last = d.get("last_bin_value")
        return ProbeConfig(d_model=int(d["d_model"]), layer=int(d["layer"]),
                           bin_edges=tuple(float(e) for e in d["bin_edges"]), hidden=int(d["hidden"]),
                           last_bin_value=None if last is None else float(last))
    except (KeyError, TypeError, ValueError) as e:
        raise ProbeFileError(f"bad probe_config in metadata: {e!r}") from e


def _to_jsonable(x: Any) -> Any:
    """numpy scalars/arrays in metrics become plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_probe(path: str | Path, head: ProbeHead, meta: dict[str, Any] | None = None) -> Path:
    """Write `head` (and its ProbeConfig plus `meta`) to directory `path`, replacing what was there."""
    path = Path(path).absolute()
    params_dir = path / PARAMS_DIR
    if params_dir.exists():
        shutil.rmtree(params_dir)  # Orbax refuses to overwrite an existing checkpoint
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    state = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), state)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(params_dir, state)
        ckpt.wait_until_finished()
    doc = {"format_version": FORMAT_VERSION, "probe_config": probe_config_to_dict(head.cfg),
           "meta": _to_jsonable(meta or {})}
    (path / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return path


def read_probe_meta(path: str | Path) -> tuple[ProbeConfig, dict[str, Any]]:
    """Only the JSON half: ProbeConfig and metadata (no weights loaded)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ProbeFileError(f"{path} is not a probe directory (no {META_FILE})")
    try:
        doc = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ProbeFileError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or "probe_config" not in doc:
        raise ProbeFileError(f"{meta_path} has no probe_config")
    return probe_config_from_dict(doc["probe_config"]), doc.get("meta", {})


def load_probe(path: str | Path) -> tuple[ProbeHead, ProbeConfig, dict[str, Any]]:
    """Restore a probe saved by `save_probe` onto the current default device."""
    path = Path(path).absolute()
    cfg, meta = read_probe_meta(path)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ProbeFileError(f"{path} has no {PARAMS_DIR}/ checkpoint")
    head = ProbeHead(cfg, rngs=nnx.Rngs(0))
    target = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(params_dir, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ProbeFileError(f"cannot restore probe weights from {params_dir}: {e}") from e
    state = nnx.state(head, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(head, state)
    return head, cfg, meta
