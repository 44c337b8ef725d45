"""The replay data set (issue 15): splits disjoint by conversation, npz round trip, tokenization."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest

from jtrail import datasets
from jtrail.replay import (
    ReplayDataError,
    ReplaySet,
    build_replay_set,
    group_keys,
    load_alpaca_eval,
    split_of,
    summary,
)


def _toy(n: int = 9) -> ReplaySet:
    rng = np.random.default_rng(0)
    names = ["train", "tune", "bench", "ood"]
    return ReplaySet([rng.integers(0, 49152, size=rng.integers(1, 30)).astype(np.int32) for _ in range(n)],
                     [rng.integers(0, 49152, size=rng.integers(1, 40)).astype(np.int32) for _ in range(n)],
                     [f"c{i}" for i in range(n)], np.asarray([names[i % 4] for i in range(n)]))


def test_save_load_round_trip_and_subset(tmp_path):
    rs = _toy()
    rs.save(tmp_path / "r.npz")
    back = ReplaySet.load(tmp_path / "r.npz")
    assert len(back) == len(rs) and back.conv_ids == rs.conv_ids
    assert list(back.split) == list(rs.split)
    for a, b in zip(rs.prompts + rs.answers, back.prompts + back.answers, strict=True):
        assert b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    tune = back.subset("tune")
    assert tune.conv_ids == ["c1", "c5"] and set(tune.split) == {"tune"}
    np.testing.assert_array_equal(tune.answer_lengths(), [len(rs.answers[1]), len(rs.answers[5])])
    assert len(back.subset("ood")) == 2
    with pytest.raises(ReplayDataError, match="split"):
        back.subset("val")
    with pytest.raises(ReplayDataError, match="not found"):
        ReplaySet.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ReplayDataError, match="lacks"):
        ReplaySet.load(tmp_path / "other.npz")


def test_validation_names_the_field():
    rs = _toy(4)
    with pytest.raises(ReplayDataError, match="answers"):
        ReplaySet(rs.prompts, [rs.answers[0], np.zeros(0, np.int32), *rs.answers[2:]], rs.conv_ids, rs.split)
    with pytest.raises(ReplayDataError, match="split"):
        ReplaySet(rs.prompts, rs.answers, rs.conv_ids, np.asarray(["train", "x", "tune", "ood"]))
    with pytest.raises(ReplayDataError, match="length"):
        ReplaySet(rs.prompts[:3], rs.answers, rs.conv_ids, rs.split)
    big = ReplaySet([np.asarray([70000], np.int32)], rs.answers[:1], ["c"], np.asarray(["train"]))
    with pytest.raises(ReplayDataError, match="uint16"):
        big.save("/tmp/never-written.npz")


def test_group_keys_join_chat_pieces_and_repeated_prompts():
    ids = ["b_0", "a_0", "b_1", "c_0", "d_0", "e"]
    prompts = ["x", "hi", "y", "hi", "z", "x"]
    keys = group_keys(ids, prompts)
    # b_0 and b_1 are one chat; "x" ties e to b; "hi" ties a and c; d stands alone.
    assert keys == ["b", "a", "b", "a", "d", "b"]
    # Order does not change the keys.
    perm = [5, 3, 1, 0, 4, 2]
    assert group_keys([ids[i] for i in perm], [prompts[i] for i in perm]) == [keys[i] for i in perm]


def test_sharegpt_split_is_disjoint_by_conversation_and_prompt():
    recs = datasets.load_sharegpt()
    keys = group_keys([r.id for r in recs], [r.prompt for r in recs])
    splits = [split_of(k) for k in keys]
    by_chat, by_prompt = defaultdict(set), defaultdict(set)
    for r, s in zip(recs, splits, strict=True):
        by_chat[re.sub(r"_\d+$", "", r.id)].add(s)
        by_prompt[r.prompt].add(s)
    assert all(len(v) == 1 for v in by_chat.values())
    assert all(len(v) == 1 for v in by_prompt.values())
    frac = {s: splits.count(s) / len(splits) for s in ("train", "tune", "bench")}
    assert abs(frac["train"] - 0.7) < 0.03 and abs(frac["tune"] - 0.1) < 0.02
    assert abs(frac["bench"] - 0.2) < 0.03
    assert split_of("QWJhYvA") == split_of("QWJhYvA")  # a pure function of the key


@pytest.fixture(scope="module")
def tokenizer():
    from jtrail.models.gguf_loader import open_gguf
    from jtrail.models.loader import embedded_gguf_path
    from jtrail.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))


def test_build_small_replay_set_matches_the_tokenizer(tokenizer, tmp_path):
    rs = build_replay_set(tokenizer, limit=60, max_answer_tokens=200, max_prompt_tokens=400)
    recs = {r.id: r for r in datasets.load_sharegpt()[:60]}
    share = [i for i, s in enumerate(rs.split) if s != "ood"]
    assert 40 <= len(share) <= 60 and 795 <= len(rs.subset("ood")) < 805  # a few exceed 400 tokens
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    assert im_end == 2
    header = tokenizer.encode("<|im_start|>assistant\n")
    capped = 0
    for i in share:
        rec = recs[rs.conv_ids[i]]
        want_p = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": rec.prompt}]))
        want_a = (tokenizer.encode(rec.answer) + [im_end])[:200]
        assert rs.prompts[i].tolist() == want_p and len(want_p) <= 400
        assert rs.prompts[i][-len(header):].tolist() == header  # ends with the assistant header
        assert rs.answers[i].tolist() == want_a
        capped += len(want_a) == 200 and want_a[-1] != im_end
    assert capped > 0  # some answers hit the 200-token cap here, and those carry no eos
    ood = load_alpaca_eval()
    assert len(ood) == 805 and rs.conv_ids[share[-1] + 1] == "alpaca_eval/0"
    assert rs.answers[share[-1] + 1].tolist() == (tokenizer.encode(ood[0].answer) + [im_end])[:200]
    assert set(rs.conv_ids[share[-1] + 1:]) <= {f"alpaca_eval/{i}" for i in range(805)}
    rs.save(tmp_path / "r.npz")
    back = ReplaySet.load(tmp_path / "r.npz")
    assert summary(back) == summary(rs)
    # The same conversation lands in the same split with or without a limit.
    small = build_replay_set(tokenizer, limit=20, include_ood=False, max_prompt_tokens=400)
    share_ids = [c for c, s in zip(rs.conv_ids, rs.split, strict=True) if s != "ood"]
    assert small.conv_ids == share_ids[:len(small)]
    assert list(small.split) == list(rs.split[:len(small)])
