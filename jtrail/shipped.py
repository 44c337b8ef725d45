"""Assets shipped with the package: the probes for the embedded SmolLM2, under jtrail/assets/.

The lookup lives in the facade, not in models/: models/ saves and loads a probe directory it is given
(models/probe_io.py) and knows nothing of what an install ships or where.
"""

from __future__ import annotations

from pathlib import Path

from jtrail.models.probe_io import META_FILE, ProbeFileError
from jtrail.serving.brain.prompt_estimator import PromptLengthEstimator

# Probes shipped for the embedded SmolLM2, by name -> directory under jtrail/assets/.
# "default": trained on the model's own greedy answers (natural generation);
# "replay": trained on recorded ShareGPT answers, teacher-forced (`jtrail train-probe --replay`).
NAMED_PROBES = {"default": "probe", "replay": "probe_replay"}

ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # package data, next to this module
# The host-side prompt estimator trained for a probe lives in the probe's directory, on its bins
# (`jtrail train-prompt-estimator`): trail's arrival_estimate="host" uses it.
PROMPT_ESTIMATOR_FILE = "prompt_estimator.npz"


def default_probe_path() -> Path:
    """The probe shipped with the package for the embedded SmolLM2 (jtrail/assets/probe). It may be
    absent from an install: `load_probe` then raises ProbeFileError naming the path, and
    `resolve_probe_path` of the name 'default' says it is not shipped."""
    return ASSETS_DIR / NAMED_PROBES["default"]


def named_probe_path(name: str) -> Path:
    """The directory of a shipped probe by name (see NAMED_PROBES); ProbeFileError names the choices."""
    if name not in NAMED_PROBES:
        raise ProbeFileError(f"probe: unknown name {name!r} (shipped: {sorted(NAMED_PROBES)})")
    return ASSETS_DIR / NAMED_PROBES[name]


def resolve_probe_path(spec: str | None) -> Path:
    """`--probe` value -> directory: None or a shipped name (default, replay) -> jtrail/assets/...,
    anything else is a path. A named probe that is not shipped in this install raises ProbeFileError;
    None gives the default's path whether or not it is there (the server then runs without a probe)."""
    if spec is None or spec in NAMED_PROBES:
        path = named_probe_path(spec or "default")
        if spec is not None and not (path / META_FILE).is_file():
            raise ProbeFileError(f"probe {spec!r} is not shipped in this install ({path} has no {META_FILE})")
        return path
    return Path(spec)


def prompt_estimator_beside(probe_dir: Path) -> PromptLengthEstimator | None:
    """The prompt estimator in a probe's directory, or None where it has none (a file that is there but
    unreadable raises PromptEstimatorFileError: a broken install should not pass silently)."""
    path = Path(probe_dir) / PROMPT_ESTIMATOR_FILE
    return PromptLengthEstimator.load(path) if path.is_file() else None
