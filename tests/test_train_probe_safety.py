"""Issue 18, `jtrail train-probe` and `LLM`: defaults never overwrite shipped assets or recorded results,
a degenerate run is an error, sizes and files are checked before any model loads."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jtrail.probe.data import ProbeFeatures

REPO = Path(__file__).resolve().parents[1]
FAST_S = 5.0


def _features(lengths: np.ndarray, finished: np.ndarray, cap: int, d: int = 16, seed: int = 0
              ) -> ProbeFeatures:
    """Synthetic features whose states carry the remaining length (so a head can learn it)."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    req = np.concatenate([np.full(k - 1, i) for i, k in enumerate(lengths)]).astype(np.int32)
    gen = np.concatenate([np.arange(1, k) for k in lengths]).astype(np.int32)
    rem = lengths[req] - gen
    tok = rng.normal(size=(len(req), 1, d)).astype(np.float16)
    tok[:, 0, 0] = rem / cap
    prm = rng.normal(size=(n, 1, d)).astype(np.float16)
    prm[:, 0, 0] = lengths / cap
    return ProbeFeatures(layers=(0,), prompt_states=prm, token_states=tok, token_request=req,
                         token_generated=gen, output_lengths=lengths.astype(np.int32),
                         prompt_lengths=np.full(n, 10, np.int32), finished=finished, max_new_tokens=cap)


TRAIN = ["--bins", "equal:4:16", "--epochs", "2", "--batch-size", "32", "--hidden", "16", "--quiet",
         "--val-fraction", "0.25"]


def _snapshot(*dirs: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for d in dirs if d.exists() for p in d.rglob("*")}


def test_defaults_go_to_a_scratch_dir_never_to_shipped_assets(tmp_path, monkeypatch) -> None:
    from jtrail.cli import main

    rng = np.random.default_rng(1)
    cache = tmp_path / "f.npz"
    _features(rng.integers(2, 16, size=24), np.ones(24, bool), 16).save(cache)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    monkeypatch.chdir(REPO)  # where the old defaults (jtrail/assets/probe, benchmarks/results) resolved
    shipped = (REPO / "jtrail" / "assets", REPO / "benchmarks" / "results")
    before = _snapshot(*shipped)
    assert main(["train-probe", "--from-features", str(cache), *TRAIN]) == 0
    assert _snapshot(*shipped) == before
    (work,) = (tmp_path / "scratch").iterdir()
    assert work.name.startswith("jtrail-train-probe-")
    assert (work / "probe" / "probe.json").is_file() and (work / "probe.json").is_file()
    assert (work / "probe_mae.png").is_file()


def test_resolved_defaults_of_both_modes_are_in_the_workdir(tmp_path) -> None:
    from jtrail.cli import build_parser
    from jtrail.probe.cli import _resolve_defaults

    for extra in ([], ["--replay", "x.npz"]):
        args = build_parser().parse_args(["train-probe", *extra])
        _resolve_defaults(args)
        for key in ("out", "results", "plot"):
            val = getattr(args, key)
            if val is not None:
                assert Path(val).is_relative_to(Path(tempfile.gettempdir())), (key, val)
        assert (args.out is None) == bool(extra)  # replay mode saves a probe only when --out is given


def test_degenerate_run_is_an_error_and_writes_nothing(tmp_path, capsys) -> None:
    from jtrail.cli import main

    cache = tmp_path / "f.npz"
    _features(np.full(24, 16), np.zeros(24, bool), 16).save(cache)  # every answer capped
    out, res = tmp_path / "probe", tmp_path / "r.json"
    args = ["train-probe", "--from-features", str(cache), "--out", str(out), "--results", str(res),
            "--plot", str(tmp_path / "p.png"), *TRAIN]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "degenerate" in err and "no answer finished" in err and "zero variance" in err
    assert not out.exists() and not res.exists()
    # accepted on request (smoke tests), and recorded as such
    assert main([*args, "--allow-degenerate"]) == 0
    assert json.loads(res.read_text())["info"]["degenerate"][:2] == [
        "no answer finished within --max-new-tokens 16 (every length is the cap)",
        "every answer has the same length (16): zero variance"]


def test_degenerate_checks_against_hand_cases() -> None:
    from jtrail.probe.checks import degenerate_data, degenerate_metrics

    assert degenerate_data(np.array([3, 5, 16]), np.array([True, True, False]), 16) == []
    assert len(degenerate_data(np.array([4, 4]), np.array([True, True]), 16)) == 1
    assert len(degenerate_data(np.array([16, 16]), np.array([False, False]), 16)) == 2
    assert degenerate_metrics({"refined_mae": 0.0, "mean_mae": 2.0}) == ["refined_mae is 0"]
    assert degenerate_metrics({"refined_mae": 0.4, "mean_mae": 2.0}) == []


def test_one_training_step_does_not_crash_optax() -> None:
    """Few prompts and one epoch: one minibatch in all (was `decay_steps=0` inside Optax)."""
    from jtrail.models.probe import ProbeConfig

    from jtrail.probe.train import TrainOptions, parse_bins, train_head

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 8)).astype(np.float32), rng.integers(0, 4, size=5)
    cfg = ProbeConfig(d_model=8, layer=0, bin_edges=parse_bins("equal:4:16"), hidden=8)
    for epochs in (1, 2, 3):
        _, losses = train_head(x, y, cfg, TrainOptions(epochs=epochs, hidden=8), progress=False)
        assert np.isfinite(losses).all()


def _cli(*args: str) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jtrail.cli", *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    r.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return r


def _assert_one_line(r: subprocess.CompletedProcess, *names: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert all(n in lines[0] for n in names), (names, lines[0])
    assert r.elapsed < FAST_S, f"{r.elapsed:.1f}s: {lines[0]}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def three_prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ds") / "three.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(3)))
    return p


@pytest.mark.parametrize("case", ["missing-dataset", "too-few-prompts", "zero-prompts", "missing-replay",
                                  "missing-features"])
def test_train_probe_input_errors_before_any_model(case: str, three_prompts: Path) -> None:
    # --model names a file that does not exist: reaching the model load would fail differently
    base = ["train-probe", "--model", "/no/such/model.gguf"]
    args, names = {
        "missing-dataset": (["--dataset", "/no/such/prompts.jsonl"], ["--dataset", "/no/such/prompts.jsonl"]),
        "too-few-prompts": (["--dataset", str(three_prompts), "--val-fraction", "0.1"],
                            ["--dataset", "unique prompts 3", "--val-fraction 0.1"]),
        "zero-prompts": (["--num-prompts", "0"], ["--num-prompts 0"]),
        "missing-replay": (["--replay", "/no/such/replay.npz"], ["--replay", "/no/such/replay.npz"]),
        "missing-features": (["--from-features", "/no/f.npz"], ["--from-features", "/no/f.npz"]),
    }[case]
    _assert_one_line(_cli(*base, *args), *names)


def test_unknown_llm_backend_fails_before_the_model_loads(monkeypatch) -> None:
    from jtrail.serving.sequence import InvalidRequestError

    import jtrail.llm as llm_mod

    monkeypatch.setattr(llm_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(InvalidRequestError, match="backend"):
        llm_mod.LLM(backend="no-such-backend")


def test_no_argparse_namespace_leaks_into_the_recorded_command() -> None:
    from jtrail.cli import build_parser
    from jtrail.probe.cli import _command, _resolve_defaults

    args = build_parser().parse_args(["train-probe", "--allow-degenerate"])
    _resolve_defaults(args)
    cmd = _command(args)
    assert "--workdir" not in cmd and "--allow-degenerate" not in cmd and isinstance(args, argparse.Namespace)
