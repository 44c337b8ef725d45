"""Host time of streaming detokenization per token: the window scheme against the byte table.

    python benchmarks/detok_cost.py [--out benchmarks/results/detok_cost.json]

Both detokenizers stream the same answers, a token at a time, with the embedded SmolLM2 tokenizer, in
alternating rounds of one process (the ratio is the figure; the absolute times are this host's). The
engine thread runs one `add` per row per step, so at 32 rows the per-token figure x 32 is host time
on every step's critical path. Checks that both streams equal `decode` of the whole answer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "detok_cost.json"
TEXT = ("The quick brown fox jumps over the lazy dog. Ça va? 日本語のテキスト 🤖 naïve café — “quotes” "
        "def f(x):\n    return x ** 2  # squared\n한국어 문장도 있습니다. ")


def per_token_us(make, ids: list[int]) -> float:
    d = make()
    t = time.perf_counter()
    for i in ids:
        d.add([i])
    d.flush()
    return (time.perf_counter() - t) / len(ids) * 1e6


def main(argv: list[str] | None = None) -> int:
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer
    from jtrail.serving.engine.detokenizer import ByteLevelDetokenizer, IncrementalDetokenizer

    from jtrail.provenance import git_commit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat-text", type=int, default=40)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    tok = Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))
    ids = tok.encode(TEXT * a.repeat_text, add_bos=False)
    makers = {"window": lambda: IncrementalDetokenizer(tok, ids[:6]),
              "byte_table": lambda: ByteLevelDetokenizer(tok.byte_table)}
    for name, make in makers.items():
        d = make()
        if "".join(d.add([i]) for i in ids) + d.flush() != tok.decode(ids):
            raise SystemExit(f"{name}: the stream differs from decode")
    times: dict[str, list[float]] = {k: [] for k in makers}
    for r in range(a.rounds):
        for name in (makers if r % 2 == 0 else reversed(makers)):
            times[name].append(per_token_us(makers[name], ids))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    doc = {"command": "python benchmarks/detok_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": f"cpu: {platform.processor() or platform.machine()}",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "tokens": len(ids), "rounds": a.rounds,
           "us_per_token_median": med, "us_per_token_all": times,
           "window_over_byte_table": med["window"] / med["byte_table"],
           "ms_per_step_at_32_rows": {k: v * 32 / 1e3 for k, v in med.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("us_per_token_median", "window_over_byte_table")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
