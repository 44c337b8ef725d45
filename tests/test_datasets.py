"""Data sets: salvaging the truncated ShareGPT file, MT-Bench questions, user JSONL."""

from __future__ import annotations

import json
import time

import pytest

from jtrail import datasets as ds


def test_salvage_truncated_array():
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    text = json.dumps(recs, indent=2)
    assert ds.salvage_json_array(text) == recs
    cut = text[: text.rindex('"q2"')]  # truncated inside the last record
    assert ds.salvage_json_array(cut) == recs[:2]
    with pytest.raises(ds.DatasetError):
        ds.salvage_json_array('{"not": "an array"}')


def test_sharegpt_real_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JTRAIL_CACHE", str(tmp_path))
    stale = tmp_path / "sharegpt-v1-123-456.pkl"  # the cache of an earlier install of the data package
    stale.write_bytes(b"old")
    ds._sharegpt_cached.cache_clear()
    t0 = time.perf_counter()
    allrec = ds.load_sharegpt(require_answer=False)
    first = time.perf_counter() - t0
    paired = ds.load_sharegpt()
    assert 10_000 < len(paired) <= len(allrec) < 17_700
    assert all(r.prompt.strip() and r.answer is not None for r in paired)
    r0 = paired[0]
    assert r0.id == "QWJhYvA_0" and r0.prompt.startswith("Summarize the main ideas of Jeff Walker")
    assert r0.answer.startswith("Here are the main ideas")
    assert len(list(tmp_path.glob("sharegpt-*.pkl"))) == 1 and not stale.exists()  # written; stale one gone
    ds._sharegpt_cached.cache_clear()
    t0 = time.perf_counter()
    again = ds.load_sharegpt(require_answer=False)
    assert again == allrec and time.perf_counter() - t0 < max(first, 0.5)
    assert ds.load_sharegpt(limit=5) == paired[:5]


def test_mtbench():
    qs = ds.load_mtbench()
    assert len(qs) == 80 and qs[0].question_id == 81 and len(qs[0].turns) == 2
    assert {q.category for q in qs} >= {"writing", "math", "coding"}
    recs = ds.mtbench_records()
    assert recs[0].prompt == qs[0].turns[0] and recs[0].source == "mt-bench"


def test_user_jsonl(tmp_path):
    p = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "hello", "answer": "hi"},
        {"text": "plain text", "id": "x"},
        {"turns": ["first", "second"], "question_id": 7},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}], "id": "c"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = ds.load_jsonl(p)
    assert [(r.prompt, r.answer) for r in recs] == [
        ("hello", "hi"),
        ("plain text", None),
        ("first", None),
        ("h", "g"),
    ]
    assert [r.id for r in recs] == ["1", "x", "7", "c"]


@pytest.mark.parametrize(
    "content,match",
    [
        ("{bad json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "  "}', "no prompt"),
        ('{"other": 1}', "no prompt"),
    ],
)
def test_user_jsonl_errors(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content + "\n")
    with pytest.raises(ds.DatasetError, match=match):
        ds.load_jsonl(p)
    with pytest.raises(ds.DatasetError, match="not found"):
        ds.load_jsonl(tmp_path / "missing.jsonl")


def test_sharegpt_token_lengths_match_the_tokenizer():
    import numpy as np
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    out, prm = ds.sharegpt_output_lengths(), ds.sharegpt_prompt_lengths()
    recs = [r for r in ds.load_sharegpt() if r.answer]
    assert len(out) == len(prm) == len(recs) > 10_000
    tok = Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))  # metadata only: no weights needed
    for i in (0, 17, len(recs) // 2, len(recs) - 1):
        assert out[i] == len(tok.encode(recs[i].answer, add_bos=False))
        assert prm[i] == len(tok.encode(recs[i].prompt, add_bos=False))
    assert 100 < float(np.median(out)) < 600 and out.max() > 2000  # heavy-tailed, like vLLM's mix
