"""Open-loop load generator: seeded arrivals, real prompts, in-process engine or gRPC server.

- Arrivals: Poisson at `rate` req/s (exponential gaps), or gamma gaps with coefficient of variation
  `cv` (cv > 1: burstier than Poisson, cv < 1: smoother); seeded, so every policy sees the same trace.
- Prompts: ShareGPT, MT-Bench or a user JSONL file through `jtrail.datasets`, chat template applied
  (the probe was trained on templated prompts).
- Modes: natural EOS (`max_tokens` cap); forced lengths (`ignore_eos=True, max_tokens=L_i`: every
  request generates exactly its profiled length, so every policy does identical work); replay (each
  request carries its recorded answer's token ids, `SamplingParams.forced_output_ids`: the engine emits
  exactly that answer, so KV, hidden states and the probe see a real answer of real length).
- Targets: `drive_engine` runs an `LLMEngine` in this thread, submitting each request when the wall
  clock passes its arrival time; `drive_grpc` streams through `jtrail.client.AsyncClient`.
Times are `time.perf_counter()` seconds on the host, relative to the start of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jtrail import datasets
from jtrail.serving.brain.capacity import StepRecord
from jtrail.serving.sequence import SamplingParams


def arrival_times(n: int, rate: float, seed: int, cv: float = 1.0) -> np.ndarray:
    """n arrival times (s) of a renewal process with mean gap 1/rate; cv = 1 is Poisson."""
    if n < 0 or not rate > 0 or not cv > 0:
        raise ValueError(f"need n >= 0, rate > 0 and cv > 0, got {n}, {rate}, {cv}")
    rng = np.random.default_rng(seed)
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n)
    else:  # gamma with shape k has cv = 1/sqrt(k); scale keeps the mean at 1/rate
        k = 1.0 / cv**2
        gaps = rng.gamma(k, 1.0 / (rate * k), n)
    return np.cumsum(gaps) - (gaps[0] if n else 0.0)  # first request at t = 0


def load_prompt_ids(source: str, tokenizer: Any, n: int, max_prompt_tokens: int, seed: int = 0,
                    chat: bool = True) -> list[list[int]]:
    """Up to n tokenized prompts, a seeded sample of the source; over-long prompts are skipped."""
    texts = datasets.prompt_texts(source)
    order = np.random.default_rng(seed).permutation(len(texts))
    out: list[list[int]] = []
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    for i in order:  # bounded by len(texts)
        t = texts[int(i)]
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}])
                               if use_chat else t)
        if 0 < len(ids) <= max_prompt_tokens:
            out.append(ids)
            if len(out) >= n:
                break
    return out


@dataclass
class Workload:
    """One trace: every policy runs exactly this (same prompts, arrivals and forced lengths)."""

    prompts: list[list[int]]
    arrival: np.ndarray  # seconds from the start of the run
    output_len: np.ndarray  # forced (profiled) lengths, or the cap in natural mode
    forced: bool = True
    request_ids: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # nominal cap sent with forced requests (None: the forced length)
    answers: list[np.ndarray] | None = None  # replay: the recorded answers (output_len = their lengths)

    def __post_init__(self) -> None:
        if self.answers is not None:
            self.output_len = np.array([len(a) for a in self.answers], np.int64)
        self.arrival = np.asarray(self.arrival, float)
        self.output_len = np.asarray(self.output_len, np.int64)
        if not (len(self.prompts) == len(self.arrival) == len(self.output_len)):
            raise ValueError("prompts, arrival and output_len need the same length")
        if not self.request_ids:
            self.request_ids = [f"r{i}" for i in range(len(self.prompts))]
        if self.max_tokens is not None and len(self) and self.max_tokens < int(self.output_len.max()):
            raise ValueError(f"max_tokens {self.max_tokens} is below a forced length {self.output_len.max()}")

    def __len__(self) -> int:
        return len(self.prompts)

    def params(self, i: int) -> SamplingParams:
        """Forced lengths: EOS is ignored and the driver stops the request at its length. max_tokens is
        the nominal cap when one is set (a server sees what a user would send; a max_tokens equal to
        the true length would hand every length-aware policy an exact upper bound)."""
        cap = self.max_tokens if (self.forced and self.max_tokens) else int(self.output_len[i])
        if self.answers is not None:  # the engine ends the request after its recorded answer
            return SamplingParams(max_tokens=cap, temperature=0.0,
                                  forced_output_ids=tuple(int(t) for t in self.answers[i]))
        return SamplingParams(max_tokens=cap, temperature=0.0, ignore_eos=self.forced)


STEP_COLUMNS = 9


@dataclass
class RunResult:
    """Per-request timings (NaN where a request did not finish) and per-step measurements."""

    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output_tokens: np.ndarray
    preemptions: np.ndarray
    itl: np.ndarray  # all inter-token gaps (s), vLLM's ITL samples
    steps: np.ndarray  # [S, 9]: batch tokens, kv tokens, seconds, prefill calls, decoding sequences,
    #                    tokens emitted, step end time (s from the start), running sequences in the
    #                    step, requests waiting before it (in-process runs only)
    wall_s: float

    @property
    def completed(self) -> np.ndarray:
        return np.isfinite(self.finish)


def step_record(steps: np.ndarray) -> StepRecord:
    """RunResult.steps rows -> the capacity module's record (end time, running, tokens out, waiting)."""
    return StepRecord(
        end_time=steps[:, 6],
        running=steps[:, 7],
        tokens_out=steps[:, 5],
        seconds=steps[:, 2],
        waiting=steps[:, 8],
    )


def _result(arrival, first, finish, nout, npre, itl: list[float], steps: list, wall: float) -> RunResult:
    st = np.asarray(steps, float).reshape(-1, STEP_COLUMNS)
    return RunResult(np.asarray(arrival, float), first, finish, nout, npre, np.asarray(itl, float), st, wall)


def drive_engine(engine: Any, wl: Workload, oracle: bool = True, timeout_s: float = 600.0,
                 idle_sleep_s: float = 0.002) -> RunResult:
    """Open loop against an in-process LLMEngine: submit at arrival times, step while work is left.

    `oracle`: give each sequence its true output length (srpt-oracle's rank; the simulator's too).
    Step records (the engine's `last_step`): batch tokens (prefill + decode tokens computed), KV
    tokens of the sequences that ran (their length before the step), seconds of `engine.step()`,
    prefill chunks (probe-only ones included), decode rows. Under async scheduling a row's counts (and
    running, waiting) are those of the batch whose outputs the step fetched (dispatched
    `engine.steps_in_flight` steps earlier).
    """
    # A full collection walks every object the process holds (a pause of up to seconds, seen mid-run
    # on the GPU): collect now and freeze what exists, as vLLM does after start-up.
    gc.collect()
    gc.freeze()
    try:
        return _drive(engine, wl, timeout_s, idle_sleep_s, oracle)
    finally:
        gc.unfreeze()


def _drive(engine: Any, wl: Workload, timeout_s: float, idle_sleep_s: float, oracle: bool) -> RunResult:
    n = len(wl)
    index = {rid: i for i, rid in enumerate(wl.request_ids)}
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    nout, npre = np.zeros(n, np.int64), np.zeros(n, np.int64)
    last_tok = np.full(n, np.nan)
    itl: list[float] = []
    steps: list[tuple[float, ...]] = []
    seqs: list[Any] = []
    t0, m0 = time.perf_counter(), time.monotonic()
    i = done = 0
    # Async scheduling: a step dispatches batch N and waits for (then processes) batch N-1, so its
    # seconds are N-1's device time (or the host's, when that is longer). Each row pairs a step's
    # seconds with the batch whose outputs it fetched, as under synchronous steps, so the step model
    # fits the same quantity either way.
    lag = engine.steps_in_flight  # async: a step processes a batch dispatched up to `lag` steps before
    in_flight: deque[tuple[int, ...]] = deque()  # the dispatched batches' counts, running and waiting
    while done < n:
        now = time.perf_counter() - t0
        if now > timeout_s:
            break
        while i < n and wl.arrival[i] <= now:  # engine clock is monotonic: give it the true arrival
            seqs.append(engine.add_request(wl.request_ids[i], wl.prompts[i], wl.params(i),
                                           arrival_time=m0 + float(wl.arrival[i]),
                                           oracle_length=int(wl.output_len[i]) if oracle else None))
            i += 1
        if not engine.has_unfinished():
            if i < n:
                time.sleep(max(0.0, min(idle_sleep_s, wl.arrival[i] - now)))
            continue
        n_run, n_wait = len(engine.running), len(engine.waiting)
        ts = time.perf_counter()
        processed = engine.batches_processed
        outs = engine.step()
        te = time.perf_counter()
        t_rel = te - t0
        emitted = 0
        for o in outs:
            k = index[o.request_id]
            m = len(o.new_token_ids)
            emitted += m
            if m:
                if np.isnan(first[k]):
                    first[k] = t_rel
                else:
                    gap = (t_rel - last_tok[k]) / m
                    itl.extend([gap] * m)
                last_tok[k] = t_rel
                nout[k] += m
            if not o.finished and wl.forced and nout[k] >= wl.output_len[k]:
                engine.abort(o.request_id)  # its forced length, reached under a nominal max_tokens
                o.finished = True
            if o.finished:
                finish[k] = t_rel
                done += 1
        st = engine.last_step  # the engine's own accounting: no per-step walk over every request
        bt, kv, calls, dec = st.batch_tokens, st.kv_tokens, st.prefill_chunks, st.decode_rows
        n_run = max(n_run, len(engine.running))  # the batch it ran: before, or after its admissions
        if lag:  # the record of the batch whose outputs this step processed (none: zeros)
            if bt or calls or dec:  # it dispatched one
                in_flight.append((bt, kv, calls, dec, n_run, n_wait))
            took = engine.batches_processed > processed
            bt, kv, calls, dec, n_run, n_wait = in_flight.popleft() if took and in_flight else (0,) * 6
        steps.append((bt, kv, time.perf_counter() - ts, calls, dec, emitted, t_rel, n_run, n_wait))
    for s in seqs:
        npre[index[s.request_id]] = s.num_preemptions
        if not s.is_finished:
            engine.abort(s.request_id)
    # async scheduling: a step may still be in flight for requests that are gone (aborted above, or
    # stopped here at their forced length): collect it, so the engine is left idle
    while engine.has_unfinished() and not (engine.waiting or engine.running):
        engine.step()
    return _result(wl.arrival, first, finish, nout, npre, itl, steps, time.perf_counter() - t0)


class StreamTimes:
    """Client-side timings of a streamed run (gRPC here, HTTP in http_bench.py): one place for the
    token accounting, so every front door is measured by the same rules. Times are perf_counter
    seconds from the start of the run."""

    def __init__(self, wl: Workload):
        n = len(wl)
        self.wl, self.t0 = wl, time.perf_counter()
        self.first, self.finish = np.full(n, np.nan), np.full(n, np.nan)
        self.last = np.full(n, np.nan)
        self.nout, self.npre = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.itl: list[float] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def wait_arrival(self, k: int) -> None:
        await asyncio.sleep(max(0.0, self.wl.arrival[k] - self.now()))

    def tokens(self, k: int, m: int, t: float) -> None:
        """m new tokens of request k arrived at t (several in one chunk share its gap)."""
        if m <= 0:
            return
        if np.isnan(self.first[k]):
            self.first[k] = t
        else:
            self.itl.extend([(t - self.last[k]) / m] * m)
        self.last[k] = t
        self.nout[k] += m

    def end(self, k: int, finished: bool, t: float) -> bool:
        """True when request k is over: the server finished it, or it reached its forced length
        under a nominal max_tokens (the client then leaves the stream, which cancels the request)."""
        wl = self.wl
        if finished or (wl.forced and self.nout[k] >= wl.output_len[k]):
            self.finish[k] = t
            return True
        return False

    def result(self) -> RunResult:
        return _result(self.wl.arrival, self.first, self.finish, self.nout, self.npre, self.itl, [],
                       self.now())


async def grpc_run(target: str, wl: Workload, timeout_s: float) -> RunResult:
    from jtrail.client import AsyncClient

    times = StreamTimes(wl)

    async def one(k: int, client: AsyncClient) -> None:
        await times.wait_arrival(k)
        p = wl.params(k)
        stream = client.generate(wl.prompts[k], timeout=timeout_s, max_tokens=p.max_tokens,
                                 temperature=0.0, ignore_eos=p.ignore_eos, request_id=wl.request_ids[k],
                                 forced_output_ids=list(p.forced_output_ids))
        async with contextlib.aclosing(stream):  # closing it cancels the RPC at once
            async for d in stream:
                t = times.now()
                times.tokens(k, len(d.token_ids), t)
                if times.end(k, d.finish_reason is not None, t):
                    break

    async with AsyncClient(target) as client:
        tasks = [asyncio.create_task(one(k, client)) for k in range(len(wl))]
        await asyncio.wait(tasks, timeout=timeout_s)
        for t in tasks:
            t.cancel()
    return times.result()


def drive_grpc(target: str, wl: Workload, timeout_s: float = 600.0) -> RunResult:
    """Open loop against a `jtrail serve` server (token-id prompts; preemptions are not visible)."""
    return asyncio.run(grpc_run(target, wl, timeout_s))
