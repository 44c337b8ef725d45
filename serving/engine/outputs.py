"""Token output: append sampled tokens, apply the stop rules (stop_rule.py), detokenize incrementally,
trim stop strings, finish and free. The engine's output beat runs `OutputProcessor`, and the offline
`LLM` path builds its final text with `final_text`: a stop token is counted but not shown, a stop
string and what follows it are cut.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..brain.predictor import Predictor
from ..brain.scheduler.base import Policy
from ..sequence import FinishReason, RequestOutput, Sequence, Status
from .batch import StepBatch, StepOutput
from .request_state import EngineRequest
from .stop_rule import StopRule


def final_text(seq: Sequence, decode: Callable[[list[int]], str], rule: StopRule) -> str:
    """A finished request's answer text: a stop token (of its `rule`) is not shown, a stop string and
    what follows it are cut (the same text the stream delivered)."""
    shown = seq.output_ids
    if seq.finish_reason is FinishReason.STOP and shown and shown[-1] in rule.stop_ids:
        shown = shown[:-1]
    text = decode(shown)
    cut = seq.params.stop_index(text)
    return text if cut is None else text[:cut]


class OutputProcessor:
    """The engine's third beat. `release(seq)` frees a finished request's slot, pages and record."""

    def __init__(self, eos_ids: tuple[int, ...], max_model_len: int, policy: Policy,
                 predictor: Predictor | None,
                 release: Callable[[Sequence], None]):
        self.eos_ids, self.max_model_len = tuple(eos_ids), max_model_len
        self.policy, self.predictor, self.release = policy, predictor, release
        self.pending: dict[str, RequestOutput] = {}  # this step's outputs, one per request
        self.finished_by_reason: dict[str, int] = {}
        self.finished_tokens = self.finished_count = 0  # mean output length: the router forecast's prior

    def stop_rule(self, seq: Sequence) -> StopRule:
        """`seq`'s stop rules under this engine's eos ids and context limit (kept in its record)."""
        return StopRule.of(seq.params, seq.num_prompt_tokens, self.eos_ids, self.max_model_len)

    def take(self) -> list[RequestOutput]:
        outs, self.pending = list(self.pending.values()), {}
        return outs

    def process(self, batch: StepBatch, out: StepOutput, reqs: dict[str, EngineRequest], now: float) -> None:
        """Apply one step's results. Under async scheduling they land after the next step was
        scheduled: a request may have been preempted since (its tokens still count, as they would
        have before the preemption), or finished or cancelled (its results are dropped)."""
        pred = self.predictor
        for i, ch in enumerate(batch.prefills):
            seq, probs = ch.seq, out.prefill_probs[i] if out.prefill_probs is not None else None
            st = _live(reqs, seq)
            if st is not None:
                st.in_flight -= 1
            if ch.probe_only or st is None:
                if pred is not None and probs is not None:
                    pred.on_prefill(seq, probs)
                    if st is not None and seq.status is Status.WAITING:
                        self.policy.on_estimate(seq)
                continue
            if not ch.completes:  # more chunks to come: keep the prompt-tap sum
                # unless a recompute preemption since dropped the KV it sums
                if seq.num_computed_tokens >= ch.start + len(ch.tokens):
                    st.tap = out.prefill_taps[i] if out.prefill_taps is not None else None
                continue
            st.ahead -= 1
            if pred is not None and probs is not None and seq.num_generated == 0:
                pred.on_prefill(seq, probs)
            self.append(st, int(out.prefill_tokens[i]), now)
        counts, rows = [], []
        tokens = out.decode_tokens.tolist() if batch.decodes else None  # Python ints: one conversion
        for row in batch.decodes:
            seq, st = row.seq, _live(reqs, row.seq)
            if st is None:
                continue  # async: it finished in a step before (a stop found late)
            st.ahead -= row.steps
            st.in_flight -= 1
            k = 0
            for j in range(row.steps):
                k += 1
                if self.append(st, tokens[j][row.slot], now, free=False):
                    break
            counts.append(k)
            rows.append(row)
        if pred is not None and out.decode_probs is not None and rows:
            seqs = [row.seq for row in rows]
            latest = out.decode_probs[np.array(counts) - 1, [row.slot for row in rows]]
            if hasattr(pred, "on_decode_rows"):  # one vectorized refinement for the step
                pred.on_decode_rows(seqs, latest, counts)
            else:
                for seq, q, k in zip(seqs, latest, counts, strict=True):
                    pred.on_decode(seq, q, k)
        for row in rows:
            if row.seq.is_finished:
                self.release(row.seq)

    def append(self, st: EngineRequest, tok: int, now: float, free: bool = True) -> bool:
        """Append one token, stream it, check stops. True if the request finished."""
        seq = st.seq
        seq.output_ids.append(tok)
        seq.token_times.append(now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        out = self.output(seq)
        out.new_token_ids.append(tok)
        out.new_text += st.detok.add([tok])
        reason, by_string = st.stop.check(tok, seq.num_generated, st.detok.text)
        if reason is None:
            return False
        self.finish(st, reason, now, free=free)
        if by_string:  # the answer ends before the stop string (vLLM): drop it from the stream
            full = st.detok.text
            excess = min(len(full) - seq.params.stop_index(full), len(out.new_text))
            out.new_text = out.new_text[: len(out.new_text) - excess]
        return True

    def output(self, seq: Sequence) -> RequestOutput:
        out = self.pending.get(seq.request_id)
        if out is None:
            out = self.pending[seq.request_id] = RequestOutput(seq.request_id, [], "", False, None,
                                                               seq.num_prompt_tokens, 0)
        out.completion_tokens = seq.num_generated
        out.remaining_estimate = seq.predicted_remaining
        return out

    def finish(self, st: EngineRequest, reason: FinishReason, now: float, free: bool = True) -> None:
        seq = st.seq
        seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, now
        out = self.output(seq)
        out.finished, out.finish_reason = True, reason
        out.new_text += st.detok.flush()
        self.finished_by_reason[reason.value] = self.finished_by_reason.get(reason.value, 0) + 1
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.finished_tokens += seq.num_generated
            self.finished_count += 1
            out.remaining_estimate = 0.0  # done: nothing left, whatever the last estimate said
        self.policy.on_finish(seq, now)
        if free:
            self.release(seq)


def _live(reqs: dict[str, EngineRequest], seq: Sequence) -> EngineRequest | None:
    """The record of `seq` if it is still served (not finished, cancelled, or replaced by a new
    request under the same id)."""
    st = reqs.get(seq.request_id)
    return st if st is not None and st.seq is seq and not seq.is_finished else None
