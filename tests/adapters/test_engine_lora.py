"""Multi-LoRA through our engine: equal to transformers + PEFT merged, and batch-invariant."""
from __future__ import annotations

import pytest

from adapters.peft_format import load_peft_adapter
from server.config import LoRAConfig
from server.engine.sequence import SamplingParams
from tests.adapters.real_lora import ALL_LINEAR, ATTENTION, make_real_adapter, merged_model
from tests.conftest import make_engine
from tests.engine.oracle import check_near_tie_rule, hf_greedy

NEW_TOKENS = 24
ADAPTERS = {  # name -> (targets, rank, seed)
    "attn-r8": (ATTENTION, 8, 1),
    "attn-r32": (ATTENTION, 32, 2),
    "all-r8": (ALL_LINEAR, 8, 3),
    "all-r16": (ALL_LINEAR, 16, 4),
}
PROMPTS = ["What is the capital of France?", "Write a haiku about snow.", "Name two planets."]


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: make_real_adapter(model_dir, root / name, targets, rank, seed)
            for name, (targets, rank, seed) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def lora_engine(model_dir, adapter_dirs):
    engine = make_engine(model_dir, lora=LoRAConfig(max_loras=4))
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, load_peft_adapter(path, engine.model_config, 64, name))
    return engine


def run(engine, jobs: list[tuple[str, list[int], int]], params: SamplingParams) -> dict[str, tuple[list[int], list[float]]]:
    """jobs: (request id, prompt ids, adapter id); all submitted at once."""
    for rid, ids, adapter_id in jobs:
        engine.add_request(rid, ids, params, adapter_id)
    out = {rid: ([], []) for rid, _, _ in jobs}
    while engine.has_unfinished:
        for d in engine.step():
            out[d.request_id][0].extend(d.new_token_ids)
            for lp in d.logprobs or []:
                out[d.request_id][1].append(lp.top[0][1] - lp.top[1][1])
    return out


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_adapter_greedy_matches_peft_merged(lora_engine, model_dir, adapter_dirs):
    engine = lora_engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    results, changed = [], 0
    eos = sorted(engine.eos_token_ids)
    for name, path in adapter_dirs.items():
        hf = merged_model(model_dir, path)
        adapter_id = engine.resolve_adapter(name)
        for k, prompt in enumerate(PROMPTS[:2]):
            ids = chat(engine, prompt)
            ref_tokens, gaps = hf_greedy(hf, ids, NEW_TOKENS, eos)
            ours = run(engine, [(f"{name}-{k}", ids, adapter_id)], params)[f"{name}-{k}"][0]
            base = run(engine, [(f"base-{name}-{k}", ids, 0)], params)[f"base-{name}-{k}"][0]
            changed += ours != base
            results.append((ours, ref_tokens, gaps))
    assert changed >= len(results) - 1, "adapters barely change the output: the test would not see a wrong delta"
    check_near_tie_rule(results, max_diverging=1)


def test_mixed_batch_equals_alone(lora_engine):
    engine = lora_engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=2)
    jobs = []
    for k, prompt in enumerate(PROMPTS):
        ids = chat(engine, prompt)
        jobs.append((f"base-{k}", ids, 0))
        for name in ADAPTERS:
            jobs.append((f"{name}-{k}", ids, engine.resolve_adapter(name)))
    alone = {}
    for job in jobs:
        alone.update(run(engine, [job], params))
    together = run(engine, jobs, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    results = [(together[rid][0], alone[rid][0], alone[rid][1]) for rid, _, _ in jobs]
    check_near_tie_rule(results, max_diverging=1)
    assert engine.kv.pool.num_used_blocks == 0
    assert all(engine.adapters.get(n).refcount == 0 for n in ADAPTERS)


def test_prefix_cache_never_shared_across_adapters(lora_engine):
    from server.engine.kv_cache import hash_block

    engine = lora_engine
    bs = engine.block_size
    ids = chat(engine, "Tell me about the history of the printing press. " * 4)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    run(engine, [("p-base", ids, 0)], params)
    base_blocks, parent = set(), None
    for i in range(len(ids) // bs):
        parent = hash_block(parent, ids[i * bs:(i + 1) * bs], 0)
        base_blocks.add(engine.kv.pool.lookup(parent))
    assert None not in base_blocks and len(base_blocks) >= 3  # the base prompt is cached
    engine.add_request("p-ad", ids, params, engine.resolve_adapter("all-r8"))
    engine.step()
    seq = engine.requests["p-ad"].sequences[0]
    assert not set(seq.block_table) & base_blocks
    while engine.has_unfinished:
        engine.step()
