"""Greedy tokens of engine variants on the real model: does a kernel change move the outputs?

    python -m jtrail.bench.greedy_parity --model SmolLM2.gguf --replay replay_all.npz
                                          # -> $OUT/greedy_parity.json (or ./greedy_parity.json)

Random weights (graph_modes' A/B) give near-tied logits, so any change of rounding flips tokens there;
real weights answer whether users would see a difference. Every variant (EngineConfig fields over the
same model, bf16) generates greedily for the same prompts, the first `--prompts` of the replay set's
bench split of at most 512 tokens (chat-formatted ShareGPT turns, as the serving benchmark sends them);
each is compared with the first variant: requests with identical tokens, and where the others first diverge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# name -> EngineConfig fields: the engine before decode_rope_write, the same again (a control: whether one
# engine's greedy tokens repeat from run to run), the engine now, plain-jnp attention
VARIANTS: dict[str, dict] = {
    "xla_rope": {"kernel_impl": "auto", "rope_in_kernel": False},
    "xla_rope_again": {"kernel_impl": "auto", "rope_in_kernel": False},
    "kernel_rope": {"kernel_impl": "auto", "rope_in_kernel": True},
    "reference_attention": {"kernel_impl": "reference", "rope_in_kernel": False},
}


def compare(outputs: dict[str, list[list[int]]]) -> dict:
    """Each variant's tokens against the first variant's: identical requests and first divergences."""
    names = list(outputs)
    base = outputs[names[0]]
    rows = {}
    for name in names[1:]:
        diverge = []
        for a, b in zip(base, outputs[name], strict=True):
            n = min(len(a), len(b))
            first = next((i for i in range(n) if a[i] != b[i]), None if len(a) == len(b) else n)
            if first is not None:
                diverge.append(first)
        rows[name] = {"identical_requests": len(base) - len(diverge), "requests": len(base),
                      "first_divergence_positions": sorted(diverge)}
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--replay", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    import jax.numpy as jnp

    from jtrail.llm import generate_batch
    from jtrail.models.loader import load_model
    from jtrail.replay import ReplaySet
    from jtrail.serving.engine.llm_engine import EngineConfig, LLMEngine
    from jtrail.serving.sequence import SamplingParams

    lm = load_model(args.model, dtype=jnp.bfloat16, progress=False)
    bench = ReplaySet.load(args.replay).subset("bench")
    prompts = [[int(t) for t in p] for p in bench.prompts if len(p) <= 512][:args.prompts]
    params = SamplingParams(max_tokens=args.max_tokens)  # greedy (temperature 0), stops at eos
    outputs, wall = {}, {}
    for name, fields in VARIANTS.items():
        cfg = EngineConfig(num_slots=32, page_size=16, num_pages=32 * (768 // 16) + 1, max_model_len=768,
                           **fields)
        engine = LLMEngine(lm.model, lm.tokenizer, cfg)
        t0 = time.perf_counter()
        outputs[name] = [list(s.output_ids) for s in generate_batch(engine, prompts, params, progress=False)]
        wall[name] = round(time.perf_counter() - t0, 1)
        print(name, wall[name], "s", sum(map(len, outputs[name])), "tokens", flush=True)
        del engine
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git_commit": os.environ.get("GIT_COMMIT"),
           "command": "python -m jtrail.bench.greedy_parity " + " ".join(argv), "model": args.model,
           "prompts": len(prompts), "max_tokens": args.max_tokens, "variants": VARIANTS, "wall_s": wall,
           "tokens": {n: sum(map(len, o)) for n, o in outputs.items()}, "against_first": compare(outputs)}
    print(json.dumps(res["against_first"]), flush=True)
    with open(os.path.join(os.environ.get("OUT") or ".", "greedy_parity.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
