"""A straight port of SafeAILab/RAIN's HH loop onto HF transformers in float64, the oracle
for RAIN's exact mode (tests/methods/test_rain.py)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from server.engine.tokenizer import IncrementalDetokenizer
from server.methods.rain import RAINOptions
from tests.methods.numerics import HeadErrors

ENDS = (",", ".", "?", ":", ";", "\n")  # a rollout ends at a text ending in one of these


class RNode:
    """nodes.py's node: children keyed by token tuple in insertion order, n, q, prior p, step."""

    def __init__(self, parent, p: float, tokens: tuple[int, ...], step: int, eps: float = 0.0) -> None:
        self.parent, self.p, self.tokens, self.step, self.eps = parent, p, tokens, step, eps
        self.children: dict[tuple[int, ...], RNode] = {}
        self.n, self.q = 0, 0.0


class Reference:
    """SafeAILab/RAIN's HH loop (main.py: gmeval, search, group_getp, simg, getv; nodes.py:
    select/getqu, backup, get_max_n_action), ported straight onto HF transformers in float64,
    with RAIN's documented deviations: no embeddings or node addition, one pair of bounds for
    the tree, token sets that end the output are terminal, capped rollouts, exponential-race
    draws from a generator seeded with the request's seed, a rule evaluator.

    Every discrete decision is checked against what the fp32 engine's logit error (at most
    delta per logit, tests/methods/numerics.py) can move: a top-k set needs its k-th and
    (k+1)-th logits > 2 delta apart; an argmax or a race, its top two log-keys > 2 delta / T
    apart (both move by their logit difference / T); a selection, a score gap above both
    children's prior errors (a prior is a product of renormalised probabilities, each off by
    2 delta / T in log space; clamping, normalising and the root mix at most quadruple that).
    """

    def __init__(self, model, tokenizer, options: RAINOptions, prompt: list[int], max_tokens: int, seed: int,
                 eos: set[int], rule: Callable[[str], float]) -> None:
        cfg = model.config
        self.model, self.tok, self.o, self.prompt, self.max_tokens, self.eos, self.rule = \
            model, tokenizer, options, prompt, max_tokens, eos, rule
        self.head_errors = HeadErrors(model.lm_head.weight, cfg.hidden_size, cfg.intermediate_size)
        self.num_layers = cfg.num_hidden_layers
        self.gen = torch.Generator().manual_seed(seed)
        self.dicp: dict[tuple[int, ...], tuple[torch.Tensor, float]] = {}
        self.dic: dict[str, float] = {}
        self.minqn, self.maxqn = -1.0, 1.0
        self.prompt_tail = tokenizer.decode(prompt)[-1:]
        self.undecided: list[tuple] = []
        self.steps: list[tuple[list[int], list[float], int]] = []
        self.rewinds = self.iterations = 0

    # -- the model and the text
    def getp(self, state: list[int]) -> tuple[torch.Tensor, float]:
        """Float64 next-token logits of `state` (memoised, as the reference's dicp) and delta."""
        key = tuple(state)
        if key not in self.dicp:
            with torch.no_grad():
                hidden = self.model.model(torch.tensor([state])).last_hidden_state[0, -1]  # after the final norm
                self.dicp[key] = (self.model.lm_head(hidden), self.head_errors(hidden, self.num_layers + 1))
        return self.dicp[key]

    def text(self, state: list[int]) -> str:
        """The reply as the server renders it: incremental detokenizing, EOS not shown."""
        detok, out = IncrementalDetokenizer(self.tok, self.prompt), ""
        for token in state[len(self.prompt):]:
            if token in self.eos:
                break
            out += detok.add(token)
        return out

    def finished(self, state: list[int]) -> bool:
        reply = state[len(self.prompt):]
        return bool(reply) and (reply[-1] in self.eos or len(reply) >= self.max_tokens)

    def settled(self, state: list[int]) -> bool:
        return self.finished(state) or (self.text(state) or self.prompt_tail).endswith(ENDS)

    # -- decisions
    def check(self, ok: bool, *what) -> None:
        if not ok:
            self.undecided.append(what)

    def filtered(self, z: torch.Tensor, delta: float, top_k: int, temperature: float) -> torch.Tensor:
        if 0 < top_k < z.numel():
            top = z.topk(top_k + 1).values
            self.check(float(top[-2] - top[-1]) > 2 * delta, "top-k set", float(top[-2] - top[-1]), delta)
            z = z.masked_fill(z < top[-2], float("-inf"))
        return (z / temperature).softmax(-1)

    def pick(self, probs: torch.Tensor, delta: float, temperature: float, greedy: bool) -> int:
        keys = probs if greedy else probs / torch.empty_like(probs).exponential_(generator=self.gen)
        top = keys.topk(2)
        if top.values[1] > 0:
            gap = math.log(top.values[0] / top.values[1])
            self.check(gap > 2 * delta / temperature, "argmax" if greedy else "draw", gap, delta)
        return int(top.indices[0])

    # -- main.py
    def simg(self, state: list[int]) -> str:
        state = list(state)
        for _ in range(self.o.rollout_max_tokens):
            if self.settled(state):
                break
            z, delta = self.getp(state)
            state.append(self.pick(z.softmax(-1), delta, 1.0, greedy=False))
        return self.text(state)

    def getv(self, state: list[int]) -> float:
        text = self.simg(state)
        if text not in self.dic:
            self.dic[text] = self.rule(text)
        return self.dic[text]

    def chunk(self, state: list[int], maxnew: int, greedy: bool) -> tuple[tuple[int, ...], float, float]:
        """One rollout of group_getp: tokens, log prior, and the log prior's error bound."""
        state, tokens, logp, err = list(state), [], 0.0, 0.0
        for _ in range(maxnew):
            z, delta = self.getp(state)
            probs = self.filtered(z, delta, self.o.chunk_top_k, self.o.temperature)
            token = self.pick(probs, delta, self.o.temperature, greedy)
            logp += math.log(float(probs[token]))
            err += 2 * delta / self.o.temperature
            tokens.append(token)
            state.append(token)
            if self.finished(state):
                break
        return tuple(tokens), logp, err

    def group_getp(self, state: list[int], topk: int, maxnew: int) -> tuple[list, float]:
        if maxnew == 1:
            z, delta = self.getp(state)
            probs = self.filtered(z, delta, topk, 1.0)
            return [((t,), float(probs[t])) for t in probs.nonzero().flatten().tolist()], 2 * delta
        greedy, glogp, err = self.chunk(state, maxnew, greedy=True)
        outs, outsset = [], [greedy]
        for _ in range(topk - 1):
            tokens, logp, e = self.chunk(state, maxnew, greedy=False)
            if tokens not in outsset:
                outsset.append(tokens)
                outs.append((tokens, math.exp(logp)))
                err = max(err, e)
        gp = math.exp(glogp)
        if outs:
            sampled = [p for _, p in outs]
            gp = max(min(gp, sum(sampled)), max(sampled) + min(sampled))
        return [(greedy, gp)] + outs, err

    def mix(self, p: list[float]) -> list[float]:
        w = self.o.root_prior_weight
        p = [w * x + (1 - w) / len(p) for x in p]
        return [x / sum(p) for x in p]

    def getqu(self, node: RNode) -> tuple[float, float]:
        qh = 0.0 if node.n == 0 else (node.q - self.minqn) / (self.maxqn - self.minqn + 1e-5)
        u = self.o.c_puct * node.p * math.sqrt(node.parent.n) / (1 + node.n)
        return qh + u, u * node.eps

    def select(self, node: RNode) -> RNode:
        scored = [(child, *self.getqu(child)) for child in node.children.values()]
        best, score, err = max(scored, key=lambda s: s[1])
        for other, s, e in scored:
            if other is not best:
                self.check(score - s > err + e, "selection", score - s, err + e)
        return best

    def backup(self, node: RNode, g: float) -> None:
        node.n += 1
        if node.parent is not None:
            self.backup(node.parent, g)
        node.q += (g - node.q) / node.n
        if node.parent is not None:
            self.minqn, self.maxqn = min(self.minqn, node.q), max(self.maxqn, node.q)

    def search(self, root: RNode, state: list[int]) -> None:
        state, cnode = list(state), root
        while cnode.children:
            cnode = self.select(cnode)
            state.extend(cnode.tokens)
        v = self.getv(state)  # a finished state is settled: no rollout
        if not self.finished(state):
            lengths = self.o.token_set_lengths
            gp, err = self.group_getp(state, self.o.token_set_size, lengths[min(cnode.step, len(lengths) - 1)])
            acp = [p for _, p in gp]
            acp = [p / sum(acp) for p in acp]
            if cnode.parent is None:
                acp = self.mix(acp)
            for (tokens, _), p in zip(gp, acp):
                cnode.children[tuple(tokens)] = RNode(cnode, p, tuple(tokens), cnode.step + 1, math.expm1(4 * err))
        self.backup(cnode, v)

    @staticmethod
    def max_n_child(root: RNode) -> RNode | None:
        if not root.children:
            return None
        most = max(c.n for c in root.children.values())
        return max((c for c in root.children.values() if c.n == most), key=lambda c: c.q)

    def gmeval(self) -> list[int]:
        o, state = self.o, list(self.prompt)
        root, initi = RNode(None, 1.0, (), 0), 0
        while True:
            for _ in range(initi, max(o.max_iterations, initi + o.min_iterations)):
                self.search(root, state)
                self.iterations += 1
                best = self.max_n_child(root)
                if best is not None and best.n > o.min_visits and best.q > o.value_threshold:
                    break
            move = self.max_n_child(root)
            kids = list(root.children.values())
            self.rewinds += sum(1 for c in kids if c is not move and c.n > 0)
            self.steps.append(([c.n for c in kids], [c.q for c in kids], kids.index(move)))
            state.extend(move.tokens)
            if self.finished(state):
                return state[len(self.prompt):]
            root, root.parent, initi = move, None, move.n
            for child, p in zip(root.children.values(), self.mix([c.p for c in root.children.values()])):
                child.p = p
