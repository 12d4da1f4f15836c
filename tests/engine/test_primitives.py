"""The engine's search primitives (fork, extend, rewind, commit, release) on exact block ids
and text state, driven by small scripted SearchMethods (clients of the public interface)."""
from __future__ import annotations

import random

import pytest
import torch

from server.engine.sequence import SamplingParams
from server.methods.search import SearchMethod
from tests.conftest import make_engine

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, logprobs=2)
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog. Then it runs into the dark forest, quickly."


@pytest.fixture(scope="module")
def small_engine(model_dir):
    return make_engine(model_dir, num_kv_blocks=64, block_size=16)


class Script(SearchMethod):
    """Runs `body(ctx)` as the driver and keeps whatever it records."""

    name = "script"

    def __init__(self, body) -> None:
        super().__init__()
        self.body = body
        self.record: dict = {}

    def run(self, ctx):
        yield from self.body(ctx, self.record)


def drive(engine, body, prompt_ids, params=GREEDY, request_id="r"):
    method = Script(body)
    engine.add_request(request_id, prompt_ids, params, method=method)
    deltas = []
    while engine.has_unfinished:
        deltas += engine.step()
    return method.record, deltas


def state(seq) -> dict:
    """Everything a rewind must restore, blocks by count (ids are checked separately)."""
    d = seq.detok
    return {"tokens": list(seq.token_ids), "text": seq.output_text, "finish": seq.finish_reason,
            "logprobs": [(lp.token_id, round(lp.logprob, 4)) for lp in seq.logprobs],
            "detok": (list(d.ids), d.prefix_offset, d.read_offset), "num_blocks": len(seq.block_table)}


def prompt(engine) -> list[int]:
    ids = engine.tokenizer.encode(PROMPT_TEXT)
    assert len(ids) % 16 != 0, "the prompt must end in a partial block for the copy-on-write checks"
    return ids


def test_fork_shares_blocks_and_the_first_write_copies(small_engine):
    engine = small_engine
    pool = engine.kv.pool

    def body(ctx, rec):
        root = ctx.output()
        yield ctx.readout([root])
        [child] = ctx.fork(root, 1)
        rec["root_blocks"], rec["child_blocks"] = list(root.block_table), list(child.block_table)
        rec["refs_after_fork"] = [pool.blocks[b].ref_count for b in root.block_table]
        yield ctx.sample([child], 3)
        rec["child_after_write"] = list(child.block_table)
        rec["refs_after_write"] = [pool.blocks[b].ref_count for b in root.block_table]
        ctx.rewind(child, 3)
        rec["child_after_rewind"] = list(child.block_table)
        ctx.release(child)
        rec["refs_after_release"] = [pool.blocks[b].ref_count for b in root.block_table]

    rec, deltas = drive(engine, body, prompt(engine))
    assert rec["child_blocks"] == rec["root_blocks"] and rec["refs_after_fork"] == [2, 2]
    # The partial last block was copied on the child's first write; the full one is still shared.
    full, partial = rec["root_blocks"]
    assert rec["child_after_write"][0] == full and rec["child_after_write"][1] != partial
    assert rec["refs_after_write"] == [2, 1]
    assert rec["child_after_rewind"] == rec["child_after_write"]  # the partial block is kept
    assert rec["refs_after_release"] == [1, 1]
    assert [d.new_token_ids for d in deltas] == [[]]  # nothing was committed: no text, one finish
    assert engine.kv.pool.num_used_blocks == 0 and not engine.requests and not engine.seqs


def test_rewind_then_extend_is_never_having_gone_there(small_engine):
    """Child A samples 12 tokens and rewinds 9; child B samples 3. Same state. Then A is rewound
    3 more and extended with those 3 tokens again: same tokens and text as B, and its next-token
    logits equal B's (recomputed K/V, within float32 rounding)."""
    engine = small_engine

    def body(ctx, rec):
        root = ctx.output()
        yield ctx.readout([root])
        a, b = ctx.fork(root, 2)
        yield ctx.sample([a], 12)
        yield ctx.sample([b], 3)
        ctx.rewind(a, 9)
        rec["a"], rec["b"] = state(a), state(b)
        tail = a.token_ids[-3:]
        ctx.rewind(a, 3)
        rec["rewound"] = state(a)
        ctx.extend(a, tail)
        ra, rb = yield ctx.readout([a, b])
        rec["a2"], rec["b2"] = state(a), state(b)
        rec["logits"] = (ra.logits, rb.logits)
        ctx.release(a)
        ctx.release(b)

    rec, _ = drive(engine, body, prompt(engine))
    assert rec["a"] == rec["b"]
    assert rec["rewound"]["text"] == "" and rec["rewound"]["tokens"] == rec["a"]["tokens"][:-3]
    a2, b2 = rec["a2"], rec["b2"]
    assert a2["tokens"] == b2["tokens"] and a2["text"] == b2["text"] and a2["detok"] == b2["detok"]
    assert a2["logprobs"] == []  # extended tokens were not sampled
    la, lb = rec["logits"]
    assert torch.equal(la.argmax(), lb.argmax())
    assert torch.allclose(la, lb, atol=1e-3, rtol=0)  # fp32 logits of magnitude ~20, batch-shape rounding
    assert engine.kv.pool.num_used_blocks == 0


def test_commit_streams_only_committed_text(small_engine):
    """Work sequences hold their text; a commit releases it into the output, and the output's
    text equals plain greedy decoding of the same tokens."""
    engine = small_engine
    ids = prompt(engine)
    engine.add_request("plain", ids, GREEDY)
    plain_text = ""
    while engine.has_unfinished:
        plain_text += "".join(d.text for d in engine.step())

    def body(ctx, rec):
        root = ctx.output()
        yield ctx.readout([root])
        for _ in range(4):
            [work] = ctx.fork(root, 1)
            yield ctx.sample([work], 16)
            ctx.commit(root, work)
            ctx.release(work)
            if root.is_finished:
                break
            yield ctx.readout([root])  # the output's KV is the work sequence's: nothing recomputed

    _, deltas = drive(engine, body, ids, request_id="search")
    text = "".join(d.text for d in deltas)
    assert deltas and all(d.index == 0 for d in deltas)
    assert plain_text.startswith(text) and len(text) > 0
    assert engine.kv.pool.num_used_blocks == 0


def test_random_aborts_leave_nothing(small_engine):
    """Search requests (forks, samples, scores-free) aborted at random steps free every block."""
    engine = small_engine
    rng = random.Random(0)

    def body(ctx, rec):
        root = ctx.output()
        yield ctx.readout([root])
        kids = ctx.fork(root, 3)
        yield ctx.sample(kids, 20, SamplingParams(max_tokens=64, temperature=1.0, seed=1))
        ctx.rewind(kids[0], 5)
        yield ctx.sample(kids[:1], 5)
        ctx.commit(root, kids[0])

    ids = prompt(engine)
    for i in range(12):
        method = Script(body)
        engine.add_request(f"abort-{i}", ids, GREEDY, method=method)
        for _ in range(rng.randint(0, 25)):
            engine.step()
        engine.abort_request(f"abort-{i}")
    while engine.has_unfinished:
        engine.step()
    assert engine.kv.pool.num_used_blocks == 0 and not engine.seqs and not engine.requests
