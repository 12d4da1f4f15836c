"""The vocabulary our JSON grammars see (server/methods/structured.py): xgrammar 0.2.9 lets a
length-bounded JSON string take raw control characters, which JSON forbids (json.loads
refuses them); our JSON compiler never offers such a token, while regexes may still use them
and tool calls keep their newlines."""
from __future__ import annotations

import pytest
import torch

from server.methods.structured import Grammars, GrammarSpec

BOUNDED = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 20}}}


@pytest.fixture(scope="module")
def grammars(model_dir):
    from transformers import AutoConfig, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    return Grammars(hf, AutoConfig.from_pretrained(str(model_dir)).vocab_size, [hf.eos_token_id])


def allowed(grammars, spec: GrammarSpec, prefix: str) -> set[int]:
    constraint = grammars.constraint(spec)
    matcher = constraint.matcher(0, grammars.hf.encode(prefix, add_special_tokens=False))
    assert matcher is not None, prefix
    mask = torch.empty(constraint.words, dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask)
    bits = (mask.view(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return set(torch.nonzero(bits.reshape(-1)).flatten().tolist())


def test_no_raw_control_characters_in_json_strings(grammars):
    hf = grammars.hf
    tab, nul = hf.convert_tokens_to_ids("ĉ"), hf.convert_tokens_to_ids("Ā")
    inside = allowed(grammars, GrammarSpec("json", BOUNDED, "response_format"), '{"a": "x')
    assert tab not in inside and nul not in inside
    assert hf.convert_tokens_to_ids("y") in inside  # the string itself goes on
    assert tab in allowed(grammars, GrammarSpec("regex", "a\\t+", "guided_regex"), "a")


def test_tool_calls_keep_their_newlines(grammars):
    spec = GrammarSpec("tool_calls", ((("f", BOUNDED),), False), "tool_choice")
    after = allowed(grammars, spec, "<tool_call>")
    assert any(grammars.hf.decode([t]).startswith("\n") for t in after)
