"""Reward-guided block search (blockwise controlled decoding), a search method.

Each round forks `beam_width` branches from the committed output, lets each sample up to
`block_tokens` tokens (one batch), scores every partial response with a reward-model
adapter, and commits the best branch's block to the output (streamed), the others dropped;
until the output finishes or `max_blocks` rounds. It sits between best-of-N (one block =
the whole response) and token-level guidance (GenARM): a wider beam buys reward at the
price of beam_width x the decode work. Partial responses are rendered for the reward
model as complete ones are (the chat template over the conversation plus the reply so far).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from server.methods.best_of_n import rank, strip_padding
from server.methods.search import SearchMethod

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request


class BlockSearchOptions(BaseModel):
    """`search`: request option of reward-guided block search."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reward_model: str
    beam_width: int = Field(4, ge=1, le=16)
    block_tokens: int = Field(16, ge=1, le=512)
    max_blocks: int = Field(8, ge=1, le=256)


class BlockSearch(SearchMethod):
    name = "search"

    def __init__(self, options: BlockSearchOptions, render: Callable[[str], list[int]] | None = None,
                 pad_token_id: int | None = None) -> None:
        super().__init__()
        self.options = options
        self.render, self.pad_token_id = render, pad_token_id
        # The branches, and their scoring passes while they are scored, plus the output.
        self.streams_per_output = 2 * options.beam_width + 1
        self.rm_id = 0
        self.blocks: list[dict[str, Any]] = []

    def prepare(self, engine: "LLMEngine") -> None:
        self.rm_id = engine.resolve_adapter(self.options.reward_model, role="rm", param="search.reward_model")

    def run(self, ctx):
        opts = self.options
        output = ctx.output()
        yield ctx.readout([output])  # one prefill; every branch forks from it
        prompt = output.token_ids[:output.num_prompt_tokens]
        for _ in range(opts.max_blocks):
            start, text_before = output.num_output_tokens, output.output_text
            branches = ctx.fork(output, opts.beam_width)
            yield ctx.sample(branches, opts.block_tokens)
            inputs = [self.render(b.output_text) if self.render else prompt + b.output_token_ids for b in branches]
            rewards = yield ctx.score([strip_padding(ids, self.pad_token_id) for ids in inputs], self.rm_id)
            best = rank(rewards)[0]
            self.blocks.append({"chosen": best, "candidates": [
                {"text": b.output_text[len(text_before):], "reward": r,
                 "num_tokens": b.num_output_tokens - start, "finish_reason": b.finish_reason}
                for b, r in zip(branches, rewards)]})
            ctx.commit(output, branches[best])
            for branch in branches:
                ctx.release(branch)
            if output.is_finished:
                return
        ctx.finish(output, "length")

    def report(self, request: "Request") -> dict[str, Any]:
        o = self.options
        return {"reward_model": o.reward_model, "beam_width": o.beam_width, "block_tokens": o.block_tokens,
                "num_blocks": len(self.blocks), "blocks": self.blocks}
