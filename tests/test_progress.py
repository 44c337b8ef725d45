"""Issue 18 item 9: `jtrail generate`'s bar counts tokens (it moves every step, not once per answer), and
the simulator shows progress on long runs."""

from __future__ import annotations

import numpy as np
import pytest
import tqdm.auto
from jtrail.serving.engine.fake_runner import ByteTokenizer, FakeRunner, encode_text
from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
from jtrail.serving.sequence import SamplingParams
from jtrail.serving.simulation.simulator import Resources, Trace, simulate
from jtrail.serving.simulation.step_model import StepModel

from jtrail.llm import generate_batch


class Recorder(tqdm.auto.tqdm):
    bars: list[Recorder] = []

    def __init__(self, *a, **kw) -> None:
        kw["disable"] = False  # pytest's stderr is no terminal: show it anyway, to count
        super().__init__(*a, **kw)
        self.updates: list[int] = []
        Recorder.bars.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        self.updates.append(n)
        return super().update(n)


@pytest.fixture
def bars(monkeypatch) -> list[Recorder]:
    Recorder.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    return Recorder.bars


def test_generate_bar_counts_tokens(bars: list[Recorder]) -> None:
    runner = FakeRunner(4, 512, 16, 0.0)
    engine = LLMEngine(None, ByteTokenizer(), EngineConfig(num_slots=4, num_pages=64, max_model_len=512),
                       runner=runner)
    prompts = [encode_text(p) for p in ("one", "two", "three")]
    # the third stops early on its second output character: its unused budget still fills the bar
    first = generate_batch(engine, prompts[2:], SamplingParams(max_tokens=8), progress=False)[0]
    stop = bytes([first.output_ids[1] - 3]).decode()
    params = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=30),
              SamplingParams(max_tokens=40, stop=[stop])]
    seqs = generate_batch(engine, prompts, params, progress=True)
    (bar,) = bars
    assert bar.unit == "tok" and bar.total == 90 and bar.n == 90
    assert seqs[2].num_generated < 40
    assert sum(1 for u in bar.updates if u) >= 20  # it moved with the steps, not three times


def test_simulator_progress_on_long_runs(bars: list[Recorder]) -> None:
    n = 20_000
    rng = np.random.default_rng(0)
    tr = Trace(np.cumsum(rng.exponential(0.01, n)), np.ones(n, int), rng.integers(1, 20, n))
    res = Resources(num_slots=8, num_pages=10_000)
    simulate(tr, "fcfs", StepModel(a=0.001), res)  # auto: a short run shows nothing
    assert bars == []
    simulate(tr, "fcfs", StepModel(a=0.001), res, progress=True)
    (bar,) = bars
    assert bar.total == n and bar.n == n and len(bar.updates) > 2
