"""A request's stop rules (vLLM's), resolved once when it is queued: the output beat checks every token
of every running request, so per token they cost a set lookup and a comparison.

A replayed answer (`forced_output_ids`) ends after its last token and nothing else stops it early;
otherwise a stop token id or eos (unless `ignore_eos`) ends with STOP, a stop string ends with STOP
(outputs.py trims it from the text); max_tokens or the context limit end with LENGTH.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sequence import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class StopRule:
    """One request's stop rules, from its params, the model's eos ids and the context limit
    (`OutputProcessor.stop_rule` builds it; the engine keeps it in the request's record)."""

    params: SamplingParams
    stop_ids: frozenset[int]  # end with STOP: stop_token_ids, and eos unless ignore_eos
    forced_len: int  # > 0: a replayed answer, which ends (STOP) after its last token and nothing else stops
    max_generated: int  # LENGTH at this many generated tokens: max_tokens, or the context limit's share

    @classmethod
    def of(cls, params: SamplingParams, num_prompt_tokens: int, eos_ids: tuple[int, ...],
           max_model_len: int) -> StopRule:
        eos = () if params.ignore_eos else eos_ids
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        return cls(params, stop_ids, len(params.forced_output_ids),
                   min(params.max_tokens, max_model_len - num_prompt_tokens))

    def check(self, token: int, num_generated: int, text: str) -> tuple[FinishReason | None, bool]:
        """(reason to finish after appending `token` as output number `num_generated`, or None; True if
        a stop string matched). `text` is the output text so far (read only when there are stop strings)."""
        if self.forced_len:
            if num_generated >= self.forced_len:
                return FinishReason.STOP, False
        elif token in self.stop_ids:
            return FinishReason.STOP, False
        elif self.params.stop and self.params.stop_index(text) is not None:
            return FinishReason.STOP, True
        if num_generated >= self.max_generated:
            return FinishReason.LENGTH, False
        return None, False
