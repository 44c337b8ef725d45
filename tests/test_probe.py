"""Probe-head training pipeline (issue 5): taps, greedy generation, features, training, evaluation, I/O,
and `jtrail train-probe` end to end on the tiny random model."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.attention import DenseMeta, dense_causal_attention
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig
from jtrail.models.probe_io import ProbeFileError, load_probe, save_probe

from jtrail.probe.data import FeatureCacheError, ProbeFeatures, collect_features, generate_greedy
from jtrail.probe.eval import evaluate_probs
from jtrail.probe.train import (
    ProbeTrainingError,
    TrainOptions,
    parse_bins,
    split_requests,
    train_and_evaluate,
    train_head,
)
from jtrail.shipped import default_probe_path

TINY = NAMED_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(TINY, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="tap_layer")
def _forward(model: Llama, tokens, length, tap_layer=None):
    """Cache-free forward of one padded row [1, 64]; logits at position length-1, taps of all positions."""
    t = tokens.shape[1]
    out = model(tokens, jnp.arange(t)[None], None, dense_causal_attention, DenseMeta(length[None]),
                tap_layer=tap_layer, logits_index=length[None] - 1)
    return out.logits[0], out.tap


def _ref(model: Llama, seq: list[int], tap_layer=None):
    toks = np.zeros((1, 64), np.int32)
    toks[0, :len(seq)] = seq
    return _forward(model, jnp.asarray(toks), jnp.int32(len(seq)), tap_layer=tap_layer)


def _greedy_reference(model: Llama, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new):
        tok = int(jnp.argmax(_ref(model, seq)[0]))
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


def test_tuple_tap_stacks_the_int_taps(model):
    seq = [5, 9, 33, 4]
    both = _ref(model, seq, (1, 0))[1]
    assert both.shape == (2, 1, 64, TINY.d_model)
    np.testing.assert_allclose(both[0], _ref(model, seq, 1)[1], atol=1e-6)
    np.testing.assert_allclose(both[1], _ref(model, seq, 0)[1], atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        _ref(model, seq, (0, 7))


def test_generation_and_features_match_uncached_forward(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (3, 17, 9, 25, 6)]
    free = _greedy_reference(model, prompts[1], 10, set())
    eos = [free[4]]  # makes prompt 1 stop at its 5th token (or earlier), eos included
    answers, finished = generate_greedy(model, prompts, 10, eos, batch_size=4, progress=False)
    for p, a, f in zip(prompts, answers, finished, strict=True):
        ref = _greedy_reference(model, p, 10, set(eos))
        assert a == ref
        assert f == (ref[-1] in eos)
    assert finished[1] and len(answers[1]) <= 5

    feats = collect_features(model, prompts, answers, finished, (0, 1), 10, token_budget=64, progress=False)
    n = np.array([len(a) for a in answers])
    assert feats.token_states.shape == ((n - 1).sum(), 2, TINY.d_model)
    assert feats.prompt_states.shape == (5, 2, TINY.d_model)
    np.testing.assert_array_equal(feats.output_lengths, n)
    # Remaining after j generated tokens is n - j, for j = 1..n-1.
    for k in (0, len(feats.token_request) - 1):
        r, j = int(feats.token_request[k]), int(feats.token_generated[k])
        assert feats.token_remaining[k] == n[r] - j >= 1
        seq = prompts[r] + answers[r][:j]
        tap = _ref(model, seq, (0, 1))[1]
        np.testing.assert_allclose(feats.token_states[k].astype(np.float32), tap[:, 0, len(seq) - 1],
                                   atol=2e-2, rtol=1e-2)
    r = 3
    tap = _ref(model, prompts[r], (1,))[1]
    np.testing.assert_allclose(feats.prompt_states[r, 1].astype(np.float32),
                               tap[0, 0, :len(prompts[r])].mean(0), atol=2e-2)


def test_bins_and_split_validation():
    assert parse_bins("equal:4:16") == (0.0, 4.0, 8.0, 12.0, 16.0)
    log = parse_bins("log:10:2048")
    assert len(log) == 11 and log[0] == 0.0 and math.isclose(log[-1], 2048.0)
    assert parse_bins("edges:0,8,64,512") == (0.0, 8.0, 64.0, 512.0)
    for bad in ("equal:1:512", "log:10:4", "edges:0,8,8", "edges:1,8,16", "uniform:10", "equal:x:5"):
        with pytest.raises(ProbeTrainingError):
            parse_bins(bad)
    with pytest.raises(ProbeTrainingError):
        TrainOptions(val_fraction=1.5)
    tr, va = split_requests(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr) & set(va)
    with pytest.raises(ProbeTrainingError):
        split_requests(1, 0.2, 0)


def test_eval_baselines_hand_computed():
    # Bins [0,2) [2,4), midpoints 1 and 3. One request of n = 3 tokens: truths 3, 2, 1.
    cfg = ProbeConfig(d_model=4, layer=0, bin_edges=(0.0, 2.0, 4.0))
    q0 = np.array([[0.0, 1.0]])  # prefill estimate 3 -> prompt-only counts down 3, 2, 1: exact
    qt = np.array([[0.0, 1.0], [1.0, 0.0]])
    ev = evaluate_probs(cfg, q0, qt, np.array([0, 0]), np.array([1, 2]), np.array([3]), max_tokens=4,
                        mean_len=2.0)
    m = ev.metrics
    assert m["prompt_only_mae"] == 0.0 and m["prompt_only_top1_acc"] == 1.0
    assert m["mean_mae"] == 1.0  # mean counts down 2, 1, 0
    assert m["raw_mae"] == pytest.approx((0 + 1 + 0) / 3)  # raw: 3, 3, 1
    assert m["eval_points"] == 3
    with pytest.raises(ValueError, match="do not cover"):
        evaluate_probs(cfg, q0, qt[:1], np.array([0]), np.array([1]), np.array([3]), 4, 2.0)


def _synthetic_features(n_req: int = 160, d: int = 16, max_new: int = 64, seed: int = 0) -> ProbeFeatures:
    """Layer 3 encodes the remaining length (plus noise) in two dimensions; layer 5 is pure noise."""
    rng = np.random.default_rng(seed)
    out_len = rng.integers(2, max_new + 1, size=n_req).astype(np.int32)
    req = np.concatenate([np.full(n - 1, i) for i, n in enumerate(out_len)]).astype(np.int32)
    gen = np.concatenate([np.arange(1, n) for n in out_len]).astype(np.int32)

    def enc(rem):
        x = rng.normal(0, 1, (len(rem), 2, d))
        x[:, 0, 0] += rem / 12.0
        x[:, 0, 1] += np.log1p(rem)
        return (x * 3 + 5).astype(np.float16)  # an offset and scale the standardization must handle

    return ProbeFeatures(layers=(3, 5), prompt_states=enc(out_len), token_states=enc(out_len[req] - gen),
                         token_request=req, token_generated=gen, output_lengths=out_len,
                         prompt_lengths=np.full(n_req, 7, np.int32), finished=np.ones(n_req, bool),
                         max_new_tokens=max_new)


def test_training_learns_synthetic_signal_and_picks_its_layer(tmp_path):
    feats = _synthetic_features()
    opts = TrainOptions(bins="equal:8:64", epochs=12, batch_size=256, hidden=64, seed=0)
    results, data = train_and_evaluate(feats, opts, progress=False)
    sig, noise = results[3].eval.metrics, results[5].eval.metrics
    assert results[3].final_loss < 0.85 * math.log(8)  # well below a uniform predictor's cross-entropy
    assert sig["refined_mae"] < 0.6 * sig["mean_mae"]
    assert sig["refined_mae"] < noise["refined_mae"]
    assert sig["probe_argmax_top1_acc"] > 2.0 / 8
    assert data["train_requests"] + data["val_requests"] == 160

    # Features cache round trip.
    feats.save(tmp_path / "f.npz")
    back = ProbeFeatures.load(tmp_path / "f.npz")
    assert back.layers == (3, 5) and back.max_new_tokens == 64
    np.testing.assert_array_equal(back.token_states, feats.token_states)
    with pytest.raises(FeatureCacheError):
        back.layer_index(4)
    with pytest.raises(FeatureCacheError):
        ProbeFeatures.load(tmp_path / "missing.npz")


def test_probe_io_round_trip_identical_predictions(tmp_path):
    rng = np.random.default_rng(0)
    cfg = ProbeConfig(d_model=16, layer=2, bin_edges=parse_bins("log:6:256"), hidden=32)
    x = (rng.normal(size=(300, 16)) * 4 + 2).astype(np.float32)
    y = cfg.bin_of(rng.integers(0, 256, 300))
    head, _ = train_head(x, y, cfg, TrainOptions(epochs=2, batch_size=64, hidden=32), progress=False)
    save_probe(tmp_path / "p", head, {"layer": 2, "metrics": {"mae": np.float32(1.5)}})
    save_probe(tmp_path / "p", head, {"layer": 2, "metrics": {"mae": np.float32(1.5)}})  # overwrite works
    head2, cfg2, meta = load_probe(tmp_path / "p")
    assert cfg2 == cfg and meta["metrics"]["mae"] == 1.5
    np.testing.assert_array_equal(np.asarray(head(x)), np.asarray(head2(x)))
    with pytest.raises(ProbeFileError):
        load_probe(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probe.json").write_text("{not json")
    with pytest.raises(ProbeFileError):
        load_probe(tmp_path / "bad")
    with pytest.raises(ProbeTrainingError):
        train_head(x[:, :8], y, cfg, TrainOptions(), progress=False)


def test_train_probe_cli_end_to_end(tmp_path, monkeypatch):
    from jtrail.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"question {i}: " + "why " * (i % 7)})
                                 for i in range(16)))
    out, res, plot = tmp_path / "probe", tmp_path / "probe.json", tmp_path / "mae.png"
    cache = tmp_path / "f.npz"
    common = ["--out", str(out), "--results", str(res), "--plot", str(plot), "--bins", "equal:4:16",
              "--epochs", "2", "--batch-size", "32", "--hidden", "32", "--quiet", "--val-fraction", "0.25",
              "--allow-degenerate"]  # the tiny random model never emits eos: every answer is capped
    rc = main(["train-probe", "--model", "tiny", "--dtype", "float32", "--dataset", str(prompts),
               "--num-prompts", "12", "--max-new-tokens", "16", "--layers", "0,1", "--gen-batch", "8",
               "--features-cache", str(cache), *common])
    assert rc == 0
    doc = json.loads(res.read_text())
    assert set(doc["bars"]) == {"refined_mae", "prompt_only_mae", "mean_predictor_mae", "layer"}
    assert doc["bars"]["layer"] in (0, 1) and [r["layer"] for r in doc["table"]] == [0, 1]
    assert doc["data"]["num_requests"] == 12 and doc["data"]["val_requests"] == 3
    assert plot.stat().st_size > 1000 and cache.is_file()
    head, cfg, meta = load_probe(out)
    assert cfg.layer == doc["bars"]["layer"] and cfg.d_model == TINY.d_model and cfg.num_bins == 4
    assert meta["metrics"]["refined_mae"] == doc["bars"]["refined_mae"]
    feats = ProbeFeatures.load(cache)
    li = feats.layer_index(cfg.layer)
    probs = np.asarray(head.probs(jnp.asarray(feats.token_states[:, li])))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    # Retrain from the cache only: the model must not be loaded.
    import jtrail.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["train-probe", "--from-features", str(cache), "--layers", "1", *common])
    assert rc == 0
    doc2 = json.loads(res.read_text())
    assert doc2["bars"]["layer"] == 1 and len(doc2["table"]) == 1
    assert main(["train-probe", "--from-features", str(tmp_path / "none.npz"), *common]) == 2
    assert main(["train-probe", "--from-features", str(cache), *common, "--bins", "bogus"]) == 2


def test_shipped_default_probe():
    """The probe shipped in jtrail/assets/probe (trained on GPU by `jtrail train-probe`, command in its
    metadata) loads on CPU, fits the embedded SmolLM2, and meets issue 5's bars on held-out requests."""
    path = default_probe_path()
    if not (path / "probe.json").is_file():
        pytest.skip("no shipped probe yet (jtrail/assets/probe)")
    head, cfg, meta = load_probe(path)
    assert cfg.d_model == NAMED_CONFIGS["smollm2-135m"].d_model and cfg.layer == meta["layer"]
    assert meta["command"].startswith("jtrail train-probe")
    probs = np.asarray(head.probs(jnp.ones((3, cfg.d_model))))
    assert probs.shape == (3, cfg.num_bins) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    m = meta["metrics"]
    assert m["refined_mae"] <= 0.75 * m["prompt_only_mae"]
    assert m["refined_mae"] <= 0.6 * m["mean_mae"]
