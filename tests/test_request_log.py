"""Issue 18: one INFO line per finished request (id, reason, prompt/output tokens, TTFT, E2E)."""

from __future__ import annotations

import asyncio
import logging
import re

from jtrail.serving.engine.fake_runner import mock_engine
from jtrail.serving.frontdoor.server import JtrailServer, ServerConfig

from jtrail.client import AsyncClient


def test_one_info_line_per_finished_request(caplog) -> None:
    caplog.set_level(logging.INFO, logger="jtrail.requests")

    async def main() -> list[tuple[int, int]]:
        server = JtrailServer(mock_engine(), ServerConfig(port=0))
        await server.start()
        c = AsyncClient(f"127.0.0.1:{server.port}")
        usage = []
        try:
            for n in (3, 5):
                last = None
                async for d in c.generate("hello there", max_tokens=n):
                    last = d
                usage.append((last.prompt_tokens, last.completion_tokens))
        finally:
            await c.close()
            await server.stop(grace_s=0.0)
        return usage

    usage = asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "jtrail.requests"]
    assert len(lines) == 2, lines
    for line, (prompt, out) in zip(lines, usage, strict=True):
        m = re.fullmatch(r"request (\S+) finished: (stop|length); prompt (\d+) tokens, output (\d+) tokens; "
                         r"TTFT \d+ms, E2E \d+ms", line)
        assert m, line
        assert m.group(1) != "-" and (int(m.group(3)), int(m.group(4))) == (prompt, out)
