"""`jtrail serve` as `make serve` runs it: a real process on loopback with the embedded SmolLM2, the
shipped probe and the `trail` policy on the continuous-batching engine (no mock)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_grpc_process import ServerProc, _launch, _terminate

from jtrail.client import AsyncClient, Client


@pytest.fixture(scope="module")
def smollm2_server() -> ServerProc:
    # --no-warmup: these tests are not about start-up; warm-up is tested in test_warmup.py (tiny model)
    sp = _launch("--no-warmup", "--slots", "4", "--pages", "256", "--max-context", "1024",
                 "--max-queue", "64", timeout=240.0, mock=False)
    yield sp
    assert _terminate(sp) == 0


def test_streams_a_real_answer_with_length_estimates(smollm2_server: ServerProc) -> None:
    with Client(smollm2_server.target) as c:
        info = c.server_info()
        assert info.policy == "trail" and "layer" in info.probe
        deltas = list(c.generate([{"role": "user", "content": "What is the capital of France?"}],
                                 max_tokens=16, timeout=180))
    text = "".join(d.text for d in deltas)
    assert "Paris" in text, text
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and last.completion_tokens == sum(
        len(d.token_ids) for d in deltas)
    # The probe's remaining-length estimate rides along the stream and counts down between refinements.
    estimates = [d.remaining_estimate for d in deltas if d.remaining_estimate is not None]
    assert estimates and all(e >= 0 for e in estimates)


def test_concurrent_requests_and_cancel_free_all_pages(smollm2_server: ServerProc) -> None:
    async def main() -> None:
        async with AsyncClient(smollm2_server.target) as c:
            async def one(i: int) -> tuple[int, int]:
                n = 0
                async for d in c.generate(f"Count to {i + 3}.", max_tokens=6 + i, ignore_eos=True,
                                          timeout=180):
                    n += len(d.token_ids)
                return n, 6 + i

            async def cancel_early() -> None:
                async for _ in c.generate("Write a long story about the sea.", max_tokens=200, timeout=180):
                    break  # leaving the stream cancels the RPC: the engine must free slot and pages

            results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(8))), cancel_early())
            assert [n for n, _ in results] == [want for _, want in results]
            deadline = time.monotonic() + 30
            while True:
                s = await c.stats()
                if s.pages_used == 0 and s.running == 0 and s.waiting == 0:
                    break
                assert time.monotonic() < deadline, f"pages not freed: {s}"
                await asyncio.sleep(0.1)

    asyncio.run(main())
