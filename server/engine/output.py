"""Output processing: sampled tokens -> text, stop strings, finish reasons, and rewinds of it all.

Every sequence but a shadow keeps its text state (incremental detokenizer, output text,
logprobs, finish reason); only outputs release text to the client, a work sequence's is held
until a method commits it into an output. A rewind rebuilds the text state by replaying the
kept tokens, so it is exactly the state of never having gone further (the detokenizer is
deterministic in its input). Penalties need no rewind: the sampler counts tokens afresh.
"""
from __future__ import annotations

from server.engine.messages import SequenceDelta, TokenLogprob
from server.engine.sequence import Sequence
from server.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, held_back_chars


class OutputProcessor:
    """Detokenizes, applies stop conditions and cuts the text each step releases."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        """Fresh text state for a sequence whose output starts after its prompt."""
        seq.detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                           seq.params.skip_special_tokens)
        seq.output_text = ""
        seq.finish_reason = None

    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> str | None:
        """Add one sampled (or committed) token; return the finish reason it causes, if any."""
        params = seq.params
        seq.token_ids.append(token)
        if seq.shadow is not None:
            seq.shadow.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        finish = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            finish = "stop"
        else:
            prev_len = len(seq.output_text)
            seq.output_text += seq.detok.add(token)
            # min_tokens holds stop strings back too (as vLLM does), not only EOS / stop tokens.
            if params.stop and seq.num_output_tokens > params.min_tokens:
                idx = find_stop(seq.output_text, params.stop, prev_len)
                if idx != -1:
                    seq.output_text = seq.output_text[:idx]
                    finish = "stop"
        if finish is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        if finish is not None:
            seq.finish_reason = finish
        return finish

    def release(self, seq: Sequence) -> str:
        """Text that may go to the client now: all of it once finished, else all but a tail
        that could still turn out to start a stop string."""
        params = seq.params
        hold = held_back_chars(seq.output_text, params.stop) if seq.finish_reason is None and params.stop else 0
        end = max(seq.num_sent_chars, len(seq.output_text) - hold)
        text = seq.output_text[seq.num_sent_chars:end]
        seq.num_sent_chars = end
        return text

    def rewind(self, seq: Sequence, new_len: int) -> None:
        """Text state as if the sequence had stopped at `new_len` tokens (KV is the caller's)."""
        if new_len < seq.num_prompt_tokens:
            raise ValueError(f"cannot rewind into the prompt ({new_len} < {seq.num_prompt_tokens} tokens)")
        kept = seq.token_ids[seq.num_prompt_tokens:new_len]
        self.start(seq)
        for token in kept:
            seq.output_text += seq.detok.add(token)
        if len(seq.output_text) < seq.num_sent_chars:
            raise ValueError("cannot rewind text that was already sent to the client")
        del seq.logprobs[len(kept):]

    @staticmethod
    def delta(seq: Sequence, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None,
              request_finished: bool) -> SequenceDelta:
        return SequenceDelta(
            request_id=seq.request.request_id, index=seq.index, new_token_ids=token_ids, text=text,
            logprobs=logprobs or None, finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            request_finished=request_finished)
