"""Rotary.float_tables: the float32 tables the layers and the decode stack read follow the buffers."""
from __future__ import annotations

import torch

from server.models.llama import Rotary
from tests.models.test_cpu_stack import tiny_model


def test_float_tables_follow_the_buffers_through_to():
    rotary: Rotary = tiny_model(torch.float32, False, (None,)).rotary
    cos32, sin32 = rotary.float_tables()
    assert cos32.dtype == sin32.dtype == torch.float32
    assert rotary.float_tables()[0] is cos32  # kept between steps
    rotary.to(torch.bfloat16)  # as a bf16 model's buffers are: the tables are the rounded ones
    cos16, sin16 = rotary.float_tables()
    assert torch.equal(cos16, cos32.to(torch.bfloat16).float()) and not torch.equal(cos16, cos32)
    assert torch.equal(sin16, sin32.to(torch.bfloat16).float())
    rotary.to(torch.float32)  # back: widened again from the (now rounded) float32 buffers
    assert rotary.float_tables()[0] is not cos16 and torch.equal(rotary.float_tables()[0], cos16)
