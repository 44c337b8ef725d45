"""Prompt pools of the front-door benchmarks: a seeded sample of prompt texts (sent as chat messages
or raw text; the servers tokenize) or of a replay split's token-id prompts with their recorded answers.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def load_pool(a: argparse.Namespace) -> list[Any]:
    """Seeded sample of prompts, as chat messages (the servers apply the model's template) or raw text.
    Over-long prompts are skipped at ~4 characters a token (the servers reject what still does not fit)."""
    from jtrail import datasets

    texts = datasets.prompt_texts(a.prompts)
    order = np.random.default_rng(a.seed).permutation(len(texts))
    pool: list[Any] = []
    for i in order:
        t = texts[int(i)]
        if 0 < len(t) <= 4 * a.max_prompt_tokens:
            pool.append(t if a.raw else [{"role": "user", "content": t}])
            if len(pool) >= a.pool:
                break
    return pool


def load_replay_pool(a: argparse.Namespace) -> tuple[list[list[int]], list[np.ndarray]]:
    """Seeded sample of the replay split's requests that fit --max-context and --max-prompt-tokens:
    token-id prompts and their recorded answers (cut to --max-output, and to --max-answer-tokens if set)."""
    from jtrail.replay import ReplaySet

    rs = ReplaySet.load(a.replay).subset(a.split)
    cut = min(a.max_output, a.max_answer_tokens or a.max_output)
    prompts: list[list[int]] = []
    answers: list[np.ndarray] = []
    for i in np.random.default_rng(a.seed).permutation(len(rs)):
        p, ans = rs.prompts[int(i)], rs.answers[int(i)][:cut]
        if len(p) <= a.max_prompt_tokens and len(p) + len(ans) < a.max_context:
            prompts.append(p.astype(np.int32).tolist())
            answers.append(ans.astype(np.int32))
            if len(prompts) >= a.pool:
                break
    return prompts, answers


def sharegpt_lengths(n: int, cap: int, seed: int) -> np.ndarray:
    """n seeded answer lengths of the simulator's routing section (ShareGPT, clipped to [1, cap])."""
    from jtrail.bench.sim_workloads import routing_lengths

    return routing_lengths(n, np.random.default_rng(seed), max_output=cap)[1]
