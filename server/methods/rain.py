"""RAIN (Rewindable Auto-regressive INference, arXiv 2309.07124), a search method.

A tree search over token sets (short chunks), as SafeAILab/RAIN's HH loop (methods.md §2).
An inner iteration, mode "exact" (the reference's order): select from the root the child
maximising v_hat + c p sqrt(N) / (1 + n) (v_hat: the value min-max normalised by running
tree-wide bounds from [-1, 1]; 0 unvisited); roll the leaf on to a phrase end (, . ? : ;
newline, EOS) and evaluate that text (memoised); unless the leaf ends the output, expand it:
depth 0 into the top-k tokens (renormalised), deeper into one greedy and k - 1 drawn chunks of
`token_set_lengths` tokens under top-15 (prior: the product of their probabilities, the
greedy one's clamped to [max + min, sum] of the distinct drawn ones'), priors renormalised and
at the root mixed 0.75 p + 0.25 uniform; back the value up (visits, running means).
Mode "batched" (default) expands the leaf into all its children at once, rolls out and
evaluates all of them together (one wait per token or evaluation pass over all children) and
backs up each child's value. The inner loop stops when the most-visited root child has
> `min_visits` visits and a value > `value_threshold`, or after max(max_iterations - visits
reused, min_iterations) iterations; the outer loop commits that child (ties by value), streams
it and re-roots there, keeping its subtree, until the output ends.

Evaluators (server.methods.rain_judges): "self" (the model answers our few-shot harmless/harmful prompt in both option
orders, each voting by P('A') vs P('B'); v = votes - 1 in {-1, 0, 1}), a reward-model adapter
(v = tanh(score): an unbounded score squashed into (-1, 1)), or a rule on the text (tests).

Deviations, on purpose: no sibling-similarity updates or dynamic node addition (they need a
sentence embedder); one pair of bounds for the whole tree (the reference's nodes keep their
first root's); token sets stop where the output would (EOS, stop strings, max_tokens) and such
a node is terminal: judged as it is, never rolled out or expanded (the reference samples on);
rollouts are capped; draws are exponential races on a generator seeded with the request's
seed; chunk lengths go by depth below the first root (the reference's node.step).
Defaults shrunk for 2 CPU cores and a 135M model [reference]: max_iterations 8 [50],
min_iterations 2 [15], min_visits 3 [6], token_set_size 4 [10], token_set_lengths [1, 2, 4, 8]
[1, 2, 4, 10], rollout_max_tokens 16 [none].
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from server.methods.rain_judges import RewardEvaluator, RuleEvaluator, SelfEvaluator
from server.methods.search import SearchMethod

if TYPE_CHECKING:
    from server.engine.engine import LLMEngine
    from server.engine.sequence import Request, Sequence

PHRASE_ENDS = (",", ".", "?", ":", ";", "\n")


class RAINOptions(BaseModel):
    """`rain`: request options (the reference's values: module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    evaluator: str = Field("self", min_length=1)  # "self" or a reward-model adapter name
    mode: Literal["batched", "exact"] = "batched"
    max_iterations: int = Field(8, ge=1, le=256)  # T_max, counting the visits a re-root reuses
    min_iterations: int = Field(2, ge=1, le=256)  # per committed token set, at least
    min_visits: int = Field(3, ge=0, le=1024)  # T_min
    value_threshold: float = Field(0.8, ge=-1.0, le=1.0)  # V
    token_set_size: int = Field(4, ge=1, le=32)  # children per node (top-k)
    token_set_lengths: list[Annotated[int, Field(ge=1, le=64)]] = Field([1, 2, 4, 8], min_length=1, max_length=8)
    chunk_top_k: int = Field(15, ge=1, le=1000)
    temperature: float = Field(1.0, gt=0.0, le=4.0)  # of multi-token chunks (the adv variant: 2)
    c_puct: float = Field(2.0, gt=0.0, le=100.0)
    root_prior_weight: float = Field(0.75, ge=0.0, le=1.0)  # root prior: w p + (1 - w) / k
    rollout_max_tokens: int = Field(16, ge=0, le=1024)


@dataclass(eq=False)
class Node:
    """A token set with its prior, visit count and mean value."""

    tokens: tuple[int, ...]
    prior: float
    depth: int  # token sets below the request's first root
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0


def probs_of(logits: torch.Tensor, top_k: int = -1, temperature: float = 1.0) -> torch.Tensor:
    """float64 probabilities of one logits row under temperature and top-k (ties kept, as HF)."""
    z = logits.detach().to("cpu", torch.float64) / temperature
    if 0 < top_k < z.numel():
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    return z.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """An exponential race, as our sampler: argmax p_i / e_i, e_i ~ Exp(1) from `generator`."""
    return int((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())


class RAIN(SearchMethod):
    """Token-set tree search with self-evaluation and rewinds (module docstring).

    `render` / `pad_token_id`: what a reward-model evaluator scores, as BestOfN's; `question`:
    the human turn the self-evaluator shows (default: the decoded prompt); `rule`: a rule
    evaluator on the reply text, in place of `options.evaluator` (tests).
    """

    name = "rain"

    def __init__(self, options: RAINOptions, render: Callable[[str], list[int]] | None = None,
                 pad_token_id: int | None = None, question: str | None = None,
                 rule: Callable[[str], float] | None = None) -> None:
        super().__init__()
        self.options, self.render, self.pad_token_id, self.question = options, render, pad_token_id, question
        self.evaluator: Any = RuleEvaluator(rule) if rule is not None else None
        # The output, a leaf and its k children; then 2k evaluation forks and a base (batched),
        # or the leaf, its rollout, an evaluation base and its two forks (exact).
        k = options.token_set_size
        self.streams_per_output = max(k + 2, 5) if options.mode == "exact" else 2 * k + 2
        self.bounds = (-1.0, 1.0)
        self.memo: dict[str, float] = {}
        self.generator = torch.Generator()
        self.prompt_tail = ""  # the prompt's last character: a phrase end before any reply
        self.iterations = self.rewinds = self.num_tokens = 0
        self.steps: list[dict[str, Any]] = []

    def prepare(self, engine: "LLMEngine") -> None:
        name = self.options.evaluator
        if self.evaluator is None and name != "self":
            adapter_id = engine.resolve_adapter(name, role="rm", param="rain.evaluator")
            self.evaluator = RewardEvaluator(name, adapter_id, self.render, self.pad_token_id)

    def run(self, ctx):
        o, out = self.options, ctx.output()
        self.generator.manual_seed(ctx.params.seed if ctx.params.seed is not None else secrets.randbits(62))
        prompt_text = ctx.tokenizer.decode(out.token_ids[:out.num_prompt_tokens])
        self.prompt_tail = prompt_text[-1:]
        if self.evaluator is None:
            self.evaluator = SelfEvaluator(ctx.tokenizer, self.question or prompt_text.strip())
        yield ctx.readout([out])  # one prefill; every work sequence forks from the output
        root, reused = Node((), 1.0, 0), 0
        while True:
            for _ in range(max(o.max_iterations - reused, o.min_iterations)):
                yield from self._iterate(ctx, root)
                self.iterations += 1
                best = self._best(root)
                if best is not None and best.visits > o.min_visits and best.value > o.value_threshold:
                    break
            best = self._best(root)  # NOTE: never None: a root does not end the output, so it expands
            self.rewinds += sum(1 for c in root.children if c is not best and c.visits > 0)
            seq, before = self._seq_at(ctx, [best]), out.output_text
            ctx.commit(out, seq)
            ctx.release(seq)
            self.steps.append({"text": out.output_text[len(before):], "chosen": root.children.index(best),
                               "root_visits": root.visits, "visits": [c.visits for c in root.children],
                               "values": [c.value for c in root.children]})
            if out.finish_reason is not None:
                return
            root, root.parent, reused = best, None, best.visits
            for child, prior in zip(root.children, self._mix([c.prior for c in root.children])):
                child.prior = prior

    @staticmethod
    def _best(root: Node) -> Node | None:
        """The most visited child, ties to the higher value, then the first."""
        return max(root.children, key=lambda c: (c.visits, c.value)) if root.children else None

    def _iterate(self, ctx, root: Node):
        path = self._select(root)
        leaf = path[-1] if path else root
        seq = self._seq_at(ctx, path)
        if seq.finish_reason is not None:  # a terminal leaf: judged as it stands, never expanded
            [value] = yield from self._judge(ctx, [seq])
            self._backup(leaf, value)
            return
        [read] = yield ctx.readout([seq])
        if self.options.mode == "exact":
            [rollout] = ctx.fork(seq, 1)
            yield from self._simulate(ctx, [rollout], [read.logits])
            [value] = yield from self._judge(ctx, [rollout])
            leaf.children, seqs = yield from self._expand(ctx, leaf, seq, read.logits, batched=False)
            for s in seqs + [seq]:
                ctx.release(s)
            self._backup(leaf, value)
            return
        children, seqs = yield from self._expand(ctx, leaf, seq, read.logits, batched=True)
        ctx.release(seq)
        yield from self._simulate(ctx, seqs)  # each child's own sequence rolls on
        values = yield from self._judge(ctx, seqs)
        leaf.children = children
        for child, value in zip(children, values):
            self._backup(child, value)

    def _select(self, root: Node) -> list[Node]:
        (lo, hi), c = self.bounds, self.options.c_puct

        def score(child: Node, parent_visits: int) -> float:
            v_hat = 0.0 if child.visits == 0 else (child.value - lo) / (hi - lo + 1e-5)
            return v_hat + c * child.prior * math.sqrt(parent_visits) / (1 + child.visits)

        path, node = [], root
        while node.children:
            node = max(node.children, key=lambda child, n=node.visits: score(child, n))
            path.append(node)
        return path

    def _backup(self, node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.value += (value - node.value) / node.visits
            if node.parent is not None:  # the root's own value is never normalised
                self.bounds = (min(self.bounds[0], node.value), max(self.bounds[1], node.value))
            node = node.parent

    def _mix(self, priors: list[float]) -> list[float]:
        w = self.options.root_prior_weight
        mixed = [w * p + (1.0 - w) / len(priors) for p in priors]
        return [p / sum(mixed) for p in mixed]

    # ---- model work ------------------------------------------------------------------------
    def _seq_at(self, ctx, path: list[Node]) -> "Sequence":
        """A work sequence at the end of `path`, forked from the output (cached blocks hit)."""
        [seq] = ctx.fork(ctx.output(), 1)
        ctx.extend(seq, [t for node in path for t in node.tokens])
        return seq

    def _append(self, ctx, seq: "Sequence", token: int) -> None:
        ctx.extend(seq, [token])
        self._count(ctx, 1)

    def _count(self, ctx, num_tokens: int) -> None:
        self.num_tokens += num_tokens
        ctx.count_generated(num_tokens)  # NOTE: usage and metrics count every token the search made

    def _expand(self, ctx, leaf: Node, seq: "Sequence", logits: torch.Tensor, batched: bool):
        """The leaf's children (priors set) and a sequence at each child's end."""
        o = self.options
        k, m = o.token_set_size, o.token_set_lengths[min(leaf.depth, len(o.token_set_lengths) - 1)]
        if m == 1:
            probs = probs_of(logits, k)
            chunks = [[t] for t in probs.nonzero().flatten().tolist()]  # by token id, as the reference
            seqs, raw = ctx.fork(seq, len(chunks)), [float(probs[t]) for [t] in chunks]
            for s, chunk in zip(seqs, chunks):
                ctx.extend(s, chunk)
            self._count(ctx, len(chunks))
        else:  # one greedy chunk, then k - 1 drawn: all at once, or one by one as the reference
            seqs, chunks, logps = ctx.fork(seq, k), [], []
            for group in [seqs] if batched else [[s] for s in seqs]:
                c, lp = yield from self._chunks(ctx, group, logits, m, [s is seqs[0] for s in group])
                chunks, logps = chunks + c, logps + lp
            keep = [i for i, c in enumerate(chunks) if c not in chunks[:i]]
            for i in sorted(set(range(k)) - set(keep)):
                ctx.release(seqs[i])
            chunks, seqs, raw = [chunks[i] for i in keep], [seqs[i] for i in keep], [math.exp(logps[i]) for i in keep]
            if len(raw) > 1:  # the greedy prior within [max + min, sum] of the sampled ones'
                raw[0] = max(min(raw[0], sum(raw[1:])), max(raw[1:]) + min(raw[1:]))
        priors = [p / sum(raw) for p in raw]
        if leaf.parent is None:
            priors = self._mix(priors)
        return [Node(tuple(c), p, leaf.depth + 1, leaf) for c, p in zip(chunks, priors)], seqs

    def _chunks(self, ctx, seqs: list["Sequence"], logits: torch.Tensor, m: int, greedy: list[bool]):
        """Extend each sequence by up to `m` tokens under top-k and temperature (the argmax
        where `greedy`, else a draw), stopping where it ends; (tokens, log prior) of each."""
        o = self.options
        tokens: list[list[int]] = [[] for _ in seqs]
        logps, rows, live = [0.0] * len(seqs), [logits] * len(seqs), list(range(len(seqs)))
        while True:
            for i in live:
                probs = probs_of(rows[i], o.chunk_top_k, o.temperature)
                token = int(probs.argmax()) if greedy[i] else draw(probs, self.generator)
                logps[i] += math.log(float(probs[token]))
                tokens[i].append(token)
                self._append(ctx, seqs[i], token)
            live = [i for i in live if len(tokens[i]) < m and seqs[i].finish_reason is None]
            if not live:
                return tokens, logps
            reads = yield ctx.readout([seqs[i] for i in live])
            for i, read in zip(live, reads):
                rows[i] = read.logits

    def _settled(self, seq: "Sequence") -> bool:
        """Ended, or its text (the prompt's, before any reply) ends a phrase."""
        return seq.finish_reason is not None or (seq.output_text or self.prompt_tail).endswith(PHRASE_ENDS)

    def _simulate(self, ctx, seqs: list["Sequence"], logits: list[torch.Tensor] | None = None):
        """Roll each sequence on, in place, to a phrase end (temperature 1, no top-k);
        `logits`: their next-token rows where already read."""
        rows = dict(enumerate(logits or []))
        live = [i for i, s in enumerate(seqs) if not self._settled(s)]
        for _ in range(self.options.rollout_max_tokens):
            if not live:
                return
            need = [i for i in live if i not in rows]
            if need:
                reads = yield ctx.readout([seqs[i] for i in need])
                rows.update((i, r.logits) for i, r in zip(need, reads))
            for i in live:
                self._append(ctx, seqs[i], draw(probs_of(rows[i]), self.generator))
            rows, live = {}, [i for i in live if not self._settled(seqs[i])]

    def _judge(self, ctx, seqs: list["Sequence"]):
        """Values of the sequences' reply texts (memoised by text); releases the sequences."""
        todo: dict[str, list[int]] = {}
        texts = [s.output_text for s in seqs]
        for text, seq in zip(texts, seqs):
            if text not in self.memo:
                todo.setdefault(text, list(seq.token_ids))
            ctx.release(seq)
        if todo:
            values = yield from self.evaluator.judge(ctx, list(todo.items()))
            self.memo.update(zip(todo, values))
        return [self.memo[t] for t in texts]

    def report(self, request: "Request") -> dict[str, Any]:
        return {"evaluator": self.evaluator.name if self.evaluator else self.options.evaluator,
                "mode": self.options.mode, "iterations": self.iterations, "rewinds": self.rewinds,
                "num_generated_tokens": self.num_tokens, "num_evaluations": len(self.memo),
                "values": [s["values"][s["chosen"]] for s in self.steps], "steps": self.steps}
