"""Async scheduling (EngineConfig.async_scheduling): step N+1 is scheduled and dispatched while step
N runs, fed N's sampled tokens on the device, and N's outputs land one step late (two with
`steps_in_flight=2`, the GPU's default). The reference is
the synchronous engine: on a mixed workload (prompt lengths over several prefill chunks, greedy and
seeded sampling, stop strings, stop tokens, eos, replayed answers, arrivals mid-run, preemption
under memory pressure in both modes, the probe with probe-only prefills) every request streams the
same tokens and text and ends for the same reason, with the tiny model and with the FakeRunner."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jtrail.models.config import NAMED_CONFIGS
from jtrail.models.llama import Llama
from jtrail.models.probe import ProbeConfig, ProbeHead
from jtrail.serving.brain.predictor import TrailPredictor
from jtrail.serving.brain.scheduler.registry import make_policy
from jtrail.serving.engine.fake_runner import ByteTokenizer, FakeLengthPredictor, FakeRunner, encode_text
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import FinishReason, RequestFailedError, SamplingParams

CFG = NAMED_CONFIGS["tiny"].replace(tie_embeddings=False)  # eos 2: the greedy outputs do reach it
MAX_LEN = 72


class HexTok:
    """Token i decodes to two hex digits, so a stop string can end inside or across tokens."""

    def encode(self, text: str) -> list[int]:
        return [int(text[i:i + 2], 16) for i in range(0, len(text), 2)]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i:02x}" for i in ids)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, dtype=jnp.float32, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def probe() -> ProbeHead:
    return ProbeHead(ProbeConfig(d_model=CFG.d_model, layer=0, hidden=32), rngs=nnx.Rngs(3))


def mixed_requests(n: int, seed: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = rng.integers(3, vocab, int(rng.integers(1, 56))).tolist()  # up to 2 chunks of 40
        m = int(rng.integers(1, 16))
        kind = i % 6
        if kind == 0:  # trace replay: the given answer, whatever eos or stops it contains
            forced = rng.integers(0, vocab, int(rng.integers(1, 10))).tolist()
            params = SamplingParams(max_tokens=len(forced) + 4, forced_output_ids=forced)
        elif kind == 1:  # seeded sampling
            params = SamplingParams(max_tokens=m, temperature=0.8, top_p=0.9, seed=100 + i)
        elif kind == 2:  # stop strings, one digit or two (across tokens)
            params = SamplingParams(max_tokens=m + 8, stop=("e1", "7", "c"), ignore_eos=True)
        elif kind == 3:  # a stop token id
            params = SamplingParams(max_tokens=m + 8, stop_token_ids=(246, 192, 78))
        else:  # greedy, eos ends it
            params = SamplingParams(max_tokens=m + 4 * (kind == 4))
        reqs.append((prompt, params))
    return reqs


def run(engine: LLMEngine, reqs, late_from: int, late_step: int = 3,
        preempt_rate: float = 0.0) -> dict[str, dict]:
    """Requests [0, late_from) at once, the rest after `late_step` steps; every output recorded.
    `preempt_rate`: each running request is also preempted between steps with this probability
    (under async scheduling: often with its tokens still in flight)."""
    got: dict[str, dict] = {}
    rng = np.random.default_rng(1)

    def add(i: int) -> None:
        prompt, params = reqs[i]
        engine.add_request(f"r{i}", prompt, params)
        got[f"r{i}"] = {"ids": [], "text": "", "reason": None, "estimates": []}

    for i in range(late_from):
        add(i)
    steps = 0
    while engine.has_unfinished() or steps <= late_step:
        if steps == late_step:
            for i in range(late_from, len(reqs)):
                add(i)
        for out in engine.step():
            g = got[out.request_id]
            g["ids"] += out.new_token_ids
            g["text"] += out.new_text
            g["estimates"].append((len(g["ids"]), out.remaining_estimate))
            if out.finished:
                assert g["reason"] is None, "a request finished twice"
                g["reason"] = out.finish_reason
        engine.blocks.check_invariants()
        for seq in list(engine.running):
            if rng.random() < preempt_rate:
                engine.preempt(seq)
        steps += 1
        assert steps < 2000, "the engine does not converge"
    assert engine.blocks.num_used == 0 and not engine._reqs
    return got


def recording(cls):
    """The predictor `cls`, keeping every probe output it is given by (request, kind, tokens so far)."""

    class Recording(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.seen: dict[tuple, np.ndarray] = {}

        def on_prefill(self, seq, probs):
            self.seen[seq.request_id, "prefill", seq.num_generated] = np.array(probs, float)
            super().on_prefill(seq, probs)

        def on_decode(self, seq, probs, n_new):
            self.seen[seq.request_id, "decode", seq.num_generated] = np.array(probs, float)
            super().on_decode(seq, probs, n_new)

        if hasattr(cls, "on_decode_rows"):
            def on_decode_rows(self, seqs, probs, n_new):
                for seq, q in zip(seqs, probs, strict=True):
                    self.seen[seq.request_id, "decode", seq.num_generated] = np.array(q, float)
                super().on_decode_rows(seqs, probs, n_new)

    return Recording


def assert_same(sync: dict[str, dict], asyn: dict[str, dict], estimates: bool) -> None:
    """Same tokens, text and finish reasons. `estimates`: the same remaining-length estimate with
    every output too (to float rounding: a prompt split into other chunks sums its probe tap in
    another order). Not under recompute preemption: the predictor is not told the token a
    recomputing prefill samples, so where the preemptions fall (which differs) shows in them."""
    assert sync.keys() == asyn.keys()
    for rid, want in sync.items():
        got = asyn[rid]
        assert got["ids"] == want["ids"], rid
        assert got["text"] == want["text"], rid
        assert got["reason"] is want["reason"], rid
        if estimates:
            assert [n for n, _ in got["estimates"]] == [n for n, _ in want["estimates"]], rid
            ge = np.array([np.nan if e is None else e for _, e in got["estimates"]], float)
            we = np.array([np.nan if e is None else e for _, e in want["estimates"]], float)
            np.testing.assert_allclose(ge, we, rtol=1e-4, atol=1e-4, equal_nan=True, err_msg=rid)


def assert_same_probe_outputs(sync: dict[tuple, np.ndarray], asyn: dict[tuple, np.ndarray]) -> None:
    """The probe output for a request at a given token is the same whenever both engines asked
    (which tokens a decode call reports differs where a recomputing prefill shifts a request's calls
    of several steps), and every request's prompt was probed in both."""
    both = sync.keys() & asyn.keys()
    prefills = {k for k in sync if k[1] == "prefill"}
    assert prefills and prefills == {k for k in asyn if k[1] == "prefill"}
    assert len(both) > len(prefills)
    for key in both:
        np.testing.assert_allclose(asyn[key], sync[key], atol=1e-5, err_msg=str(key))


def model_config(**kw) -> EngineConfig:
    base = dict(num_slots=6, page_size=4, num_pages=40, max_model_len=MAX_LEN, prefill_buckets=(8, 16, 32),
                max_prefill_tokens_per_step=40, kernel_impl="reference")
    base.update(kw)
    return EngineConfig(**base)


@pytest.mark.parametrize("mode,k,pages,depth", [("recompute", 2, 26, 1), ("swap", 1, 26, 1),
                                                ("recompute", 2, 200, 1), ("recompute", 1, 26, 2),
                                                ("swap", 2, 26, 2), ("keep", 1, 26, 2)])
def test_async_equals_sync_tiny_model(model, probe, mode, k, pages, depth):
    """depth: steps_in_flight (2: the host schedules two steps ahead)."""
    reqs = mixed_requests(16, seed=11, vocab=CFG.vocab_size)
    edges = np.linspace(0, 20, probe.cfg.num_bins + 1)
    results, engines, preds = [], [], []
    for async_on in (False, True):
        cfg = model_config(preemption_mode=mode, decode_steps_per_call=k, num_pages=pages,
                           policy=make_policy("trail"), async_scheduling=async_on, steps_in_flight=depth)
        pred = recording(TrailPredictor)(edges)
        engine = LLMEngine(model, HexTok(), cfg, probe=probe, predictor=pred)
        results.append(run(engine, reqs, late_from=10, preempt_rate=0.05 if mode != "recompute" else 0.0))
        engines.append(engine)
        preds.append(pred.seen)
    sync, asyn = results
    # the workload exercises what it claims to, in both engines
    reasons = [r["reason"] for r in sync.values()]
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    eos_stops = [rid for rid, r in sync.items() if reqs[int(rid[1:])][1].stop_token_ids == ()
                 and not reqs[int(rid[1:])][1].forced_output_ids and r["ids"][-1:] == [2]]
    string_stops = [rid for rid, r in sync.items() if reqs[int(rid[1:])][1].stop
                    and r["reason"] is FinishReason.STOP]
    assert eos_stops and string_stops
    for e in engines:
        assert (e.num_preemptions > 0) == (pages < 100) and e.probe_calls > 0
    assert_same(sync, asyn, estimates=mode == "swap" or pages >= 100)
    assert_same_probe_outputs(*preds)


@pytest.mark.parametrize("mode,pages,async_on,depth", [("recompute", 200, True, 2), ("swap", 26, True, 1),
                                                       ("recompute", 200, False, 1), ("keep", 26, True, 2)])
def test_mixed_steps_equal_separate_prefill_and_decode_calls(model, probe, mode, pages, async_on, depth):
    """EngineConfig.mixed_steps: a step's prefill chunks (probe-only prefills of waiting requests
    included) and decode rows in one forward give every request the same tokens, text, finish reason,
    remaining-length estimates and probe outputs as a prefill call then a decode call, and a step
    makes one device call."""
    reqs = mixed_requests(16, seed=13, vocab=CFG.vocab_size)
    edges = np.linspace(0, 20, probe.cfg.num_bins + 1)
    results, preds, engines = [], [], []
    for mixed in (False, True):
        cfg = model_config(preemption_mode=mode, num_pages=pages, policy=make_policy("trail"),
                           mixed_steps=mixed, async_scheduling=async_on, steps_in_flight=depth)
        pred = recording(TrailPredictor)(edges)
        engine = LLMEngine(model, HexTok(), cfg, probe=probe, predictor=pred)
        calls = []
        real_execute = engine.runner.execute

        def counting(batch, engine=engine, calls=calls, real_execute=real_execute):
            before = engine.runner.calls
            handle = real_execute(batch)
            calls.append((bool(batch.prefills), bool(batch.decodes), engine.runner.calls - before))
            return handle

        engine.runner.execute = counting
        results.append(run(engine, reqs, late_from=10, preempt_rate=0.05 if mode != "recompute" else 0.0))
        preds.append(pred.seen)
        engines.append((engine, calls))
    (two, two_calls), (one, one_calls) = engines
    assert one.runner.mixed_steps and not two.runner.mixed_steps and one.probe_calls > 0
    assert any(p and d for p, d, _ in one_calls)  # steps that prefill and decode together
    assert all(n == 1 for _, _, n in one_calls)
    assert any(n == 2 for _, _, n in two_calls)
    assert one.runner.trace_counts["mixed"] > 0
    # (keep at 26 pages: kept requests' KV goes for pages, and they recompute)
    assert_same(results[0], results[1], estimates=mode == "swap" or pages >= 100)
    assert_same_probe_outputs(*preds)


@pytest.mark.parametrize("depth", [1, 2])
def test_async_cancel_in_flight(model, depth):
    """A request cancelled while its step is in flight: its slot and pages come back, its late
    tokens are dropped, the others are unchanged."""
    reqs = mixed_requests(6, seed=5, vocab=CFG.vocab_size)
    want = run(LLMEngine(model, HexTok(), model_config(decode_steps_per_call=2)), reqs, late_from=6)
    engine = LLMEngine(model, HexTok(), model_config(decode_steps_per_call=2, async_scheduling=True,
                                                     steps_in_flight=depth))
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params)
    got = {f"r{i}": [] for i in range(len(reqs))}

    def step() -> None:
        for o in engine.step():
            got[o.request_id] += o.new_token_ids

    for _ in range(depth + 1):
        step()
    assert len(engine._in_flight) == depth
    victim = next(s.request_id for s in engine.running if not s.is_finished)
    out = engine.abort(victim)
    assert out is not None and out.finish_reason is FinishReason.CANCELLED
    got[victim] += out.new_token_ids
    before = list(got[victim])
    engine.blocks.check_invariants()
    while engine.has_unfinished():
        step()
        engine.blocks.check_invariants()
    assert engine.blocks.num_used == 0
    assert got[victim] == before and want[victim]["ids"][:len(before)] == before  # nothing after the cancel
    assert {rid: ids for rid, ids in got.items() if rid != victim} == {
        rid: w["ids"] for rid, w in want.items() if rid != victim}


def test_async_step_stats_and_calls(model):
    """last_step describes the batch each step dispatched; a step makes at most two runner calls."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [(list(range(3, 3 + 10 * (i + 1))), params) for i in range(4)]
    engine = LLMEngine(model, HexTok(), model_config(async_scheduling=True))
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params)
    total, calls = 0, engine.runner.calls
    while engine.has_unfinished():
        engine.step()
        st = engine.last_step
        assert engine.runner.calls - calls <= 2 and st.seconds > 0
        calls = engine.runner.calls
        total += st.batch_tokens
    prompt_tokens = sum(len(p) for p, _ in reqs)
    # every prompt token once, every decode step once: 4 x 5 decode tokens (the 6th is the prefill's),
    # plus at most one dropped row-step per request (none here: max_tokens is known when scheduling)
    assert total == prompt_tokens + 4 * 5


def fake_engine(mode: str, k: int, async_on: bool, depth: int = 1) -> LLMEngine:
    cfg = EngineConfig(num_slots=5, page_size=4, num_pages=36, max_model_len=MAX_LEN,
                       prefill_buckets=(8, 16, 32), max_prefill_tokens_per_step=40, decode_steps_per_call=k,
                       preemption_mode=mode, policy=make_policy("trail"), async_scheduling=async_on,
                       steps_in_flight=depth)
    runner = FakeRunner(cfg.num_slots, cfg.max_model_len, cfg.page_size, probe=True)
    return LLMEngine(None, ByteTokenizer(), cfg, predictor=recording(FakeLengthPredictor)(), runner=runner)


@pytest.mark.parametrize("mode,k,depth", [("recompute", 1, 1), ("swap", 3, 1), ("recompute", 1, 2),
                                          ("swap", 3, 2), ("keep", 1, 2)])
def test_async_equals_sync_fake_runner(mode, k, depth):
    reqs = mixed_requests(24, seed=2, vocab=200)
    # the fake runner's letters: stop strings that occur, and an eos in a replayed answer
    reqs = [(p, SamplingParams(max_tokens=s.max_tokens, stop=("k", "qd"), ignore_eos=True))
            if s.stop else (p, s) for p, s in reqs]
    reqs.append((encode_text("hello"), SamplingParams(max_tokens=9, forced_output_ids=(70, 2, 71))))
    engines = [fake_engine(mode, k, async_on, depth) for async_on in (False, True)]
    sync, asyn = (run(e, reqs, late_from=14, preempt_rate=0.1) for e in engines)
    for e in engines:
        assert e.num_preemptions > 0 and e.probe_calls > 0
    assert any(r["reason"] is FinishReason.STOP for rid, r in sync.items() if reqs[int(rid[1:])][1].stop)
    assert_same(sync, asyn, estimates=mode == "swap")
    assert_same_probe_outputs(*(e.predictor.seen for e in engines))


class FailingFetch(FakeRunner):
    fail_at = 6  # the fetch that raises (a lost device, say)

    def fetch(self, handle):
        self.fetches = getattr(self, "fetches", 0) + 1
        if self.fetches == self.fail_at:
            raise RuntimeError("device lost")
        return handle


@pytest.mark.parametrize("depth", [1, 2])
def test_async_failed_step_names_its_requests(depth):
    """A step that fails loses its results and those of the steps in flight: the engine names their
    requests (for the front end to fail), nothing stays counted in flight, and the rest is served
    as the synchronous engine serves it."""
    reqs = mixed_requests(12, seed=4, vocab=200)
    want = run(fake_engine("recompute", 2, False), reqs, late_from=12)
    engine = fake_engine("recompute", 2, True, depth)
    engine.runner.__class__ = FailingFetch
    got = {f"r{i}": [] for i in range(len(reqs))}
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params)
    failed: set[str] = set()
    while engine.has_unfinished():
        # the requests with work in the calls in flight (their results will be lost with the step's)
        unfinished = {rid for rid, st in engine._reqs.items() if not st.seq.is_finished}
        in_flight = unfinished & {
            s.request_id for b, _ in engine._in_flight
            for s in [c.seq for c in b.prefills if not c.probe_only] + [r.seq for r in b.decodes]}
        try:
            outs = engine.step()
        except RuntimeError:
            lost = engine.pending_output_ids()
            assert lost and not engine._in_flight
            assert in_flight <= lost  # every batch in flight is named, not only the newest
            assert all(st.ahead == 0 and st.in_flight == 0 for st in engine._reqs.values())
            for rid in lost:
                engine.abort(rid)
            failed |= lost
            assert not engine.pending_output_ids()
            continue
        for o in outs:
            got[o.request_id] += o.new_token_ids
        engine.blocks.check_invariants()
    assert engine.blocks.num_used == 0 and engine.runner.fetches > FailingFetch.fail_at
    served = [rid for rid in got if rid not in failed]
    assert served and all(got[rid] == want[rid]["ids"] for rid in served)


@pytest.mark.parametrize("depth", [1, 2])
def test_requests_kept_after_a_failed_step_recompute_and_finish(depth):
    """A step fails on one request (the server fails only that one): the others lost results of
    the calls in flight. They restart as after a recompute preemption, so a later swap preemption
    copies the pages their kept tokens need (it crashed at swap-in when their KV progress still
    counted the lost calls), every page comes back, and their answers equal a clean run's."""
    def engine() -> LLMEngine:
        cfg = EngineConfig(num_slots=4, page_size=4, num_pages=40, max_model_len=64, prefill_buckets=(8, 16),
                           max_prefill_tokens_per_step=16, async_scheduling=True, steps_in_flight=depth,
                           decode_steps_per_call=2, preemption_mode="swap")
        e = LLMEngine(None, ByteTokenizer(), cfg, runner=FakeRunner(4, 64, 4))
        for r in "abc":
            e.add_request(r, [5, 6, 7 + ord(r)], SamplingParams(max_tokens=30, ignore_eos=True))
        return e

    def collect(e: LLMEngine, got: dict[str, list[int]], steps: int | None = None) -> None:
        n = 0
        while e.has_unfinished() and (steps is None or n < steps):
            for o in e.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
            n += 1

    want: dict[str, list[int]] = {}
    collect(engine(), want)
    e, got, appended = engine(), {}, {"n": 0}
    real_append = e.outputs.append

    def append(st, tok, now, free=True):
        appended["n"] += 1
        if appended["n"] == 12:
            raise RequestFailedError(st.seq.request_id, "boom")
        return real_append(st, tok, now, free)

    e.outputs.append = append
    with pytest.raises(RequestFailedError) as failed:
        collect(e, got, 20)
    bad = failed.value.request_id
    e.abort(bad)  # what AsyncLLMEngine._step does
    kept = [s for s in e.running if s.request_id in e.pending_output_ids()]
    assert kept and all(s.num_computed_tokens == 0 for s in kept)
    for s in list(e.running):
        e.preempt(s)  # by swap
    collect(e, got)
    assert e.blocks.num_used == 0 and not e.requests
    for rid in set("abc") - {bad}:
        assert got[rid] == want[rid] and len(want[rid]) == 30
