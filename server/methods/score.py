"""ScoreRequest: a request that is one reward-model pass (its score head at the last position).

The request's own adapter is the reward model; the driver reads the prefill's final-norm
tap, applies the head, and ends. `AsyncEngine.score` and best-of-N outside the engine use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.methods.search import SearchMethod
from server.models.llama import FINAL_NORM_TAP

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request


class ScoreRequest(SearchMethod):
    name = "score"
    tap_layers = (FINAL_NORM_TAP,)

    def __init__(self, adapter_id: int) -> None:
        super().__init__()
        self.adapter_id = adapter_id
        self.score: list[float] = []

    def prepare(self, engine: "LLMEngine") -> None:
        from server.engine.engine import RequestError

        entry = engine.adapters.by_id(self.adapter_id)
        if entry is None or "score.weight" not in entry.weights.extra:
            raise RequestError(f"adapter id {self.adapter_id} is not a loaded reward model", "reward_model", 404)
        self.head = entry.weights.extra["score.weight"]

    def run(self, ctx):
        [readout] = yield ctx.readout([ctx.output()])
        hidden = readout.taps[FINAL_NORM_TAP]
        self.score = (hidden.to(self.head.device, self.head.dtype) @ self.head.T).float().tolist()
        ctx.finish(ctx.output(), "stop")

    def final_extra(self, request: "Request") -> dict[str, Any]:
        return {"score": self.score}
