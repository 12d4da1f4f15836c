"""Model runner: owns the weights and KV tensors, packs a step into one flat batch, runs it.

In: a SchedulerOutput. Out: a ModelOutput with float32 logits for the rows that reach
the end of their sequence, and hidden-state taps for the rows that asked. It does not
sample and knows nothing of requests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels import cpu_ext
from kernels.dispatch import lora_plan, use_triton
from kernels.paged_attention_cpu import plan_attention
from server.engine.malloc import keep_freed_buffers
from server.engine.messages import ModelOutput, SchedulerOutput
from server.engine.profiler import StepProfiler
from server.models.config import ModelConfig
from server.models.llama import AttentionMetadata, CausalLM, LoRABatch

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry


class ModelRunner:
    """Runs the decoder over a paged KV cache."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, kernel_backend: str = "auto",
                 adapters: "AdapterRegistry | None" = None, profiler: StepProfiler | None = None) -> None:
        self.model = model
        self.profiler = profiler or StepProfiler()
        self.adapters = adapters
        self.config: ModelConfig = model.config
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kernel_backend = kernel_backend
        shape = (num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim)
        if device.type == "cpu":
            cpu_ext.decode_kernel_for(dtype)  # build (once per machine) before the first step, not during it
            keep_freed_buffers()  # steps reuse their MB-sized buffers instead of faulting them in anew
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(self.config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write block copies before the step writes into them."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _lora_batch(self, sched: SchedulerOutput) -> LoRABatch | None:
        """Per-token adapter slots, or None when the whole step runs the base model."""
        if self.adapters is None or all(s.adapter_id == 0 for s in sched.scheduled):
            return None
        slots: list[int] = []
        ranks: dict[int, int] = {}
        for s in sched.scheduled:
            slot = self.adapters.slot_of(s.adapter_id)
            slots.extend([slot] * s.num_new_tokens)
            if slot >= 0:
                ranks[slot] = self.adapters.by_id(s.adapter_id).weights.rank
        indices = torch.tensor(slots, dtype=torch.int64, device=self.device)
        groups = lora_plan(slots, ranks, self.device, self.dtype, self.kernel_backend)
        return LoRABatch(indices, self.adapters.stacks, self.kernel_backend, groups, self.adapters.layout_version)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        t = self.profiler.now()
        self.copy_blocks(sched.copy_blocks)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_locs = [0]
        logit_rows: list[int] = []
        logit_seq_ids: list[int] = []
        tap_rows: dict[int, tuple[int, tuple[int, ...]]] = {}
        prompt_rows: dict[int, tuple[int, int, int, tuple[int, ...]]] = {}  # seq_id -> rows [a, b), start, taps
        max_blocks = max(len(s.block_table) for s in sched.scheduled)
        tables: list[list[int]] = []
        for s in sched.scheduled:
            input_ids.extend(s.token_ids)
            end = s.start + s.num_new_tokens
            table = s.block_table
            if s.num_new_tokens == 1:  # decode: skip the range machinery
                positions.append(s.start)
                slots.append(table[s.start // bs] * bs + s.start % bs)
            else:
                pos = range(s.start, end)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(end)
            if s.prompt_taps:
                first = query_start_locs[-1]
                prompt_rows[s.seq_id] = (first, first + min(end, s.num_prompt_tokens) - s.start, s.start,
                                         s.prompt_taps)
            query_start_locs.append(query_start_locs[-1] + s.num_new_tokens)
            tables.append(table + [0] * (max_blocks - len(table)))
            if s.needs_logits:
                logit_rows.append(query_start_locs[-1] - 1)
                logit_seq_ids.append(s.seq_id)
                if s.tap_layers:
                    tap_rows[s.seq_id] = (query_start_locs[-1] - 1, s.tap_layers)
        dev = self.device
        block_tables = torch.tensor(tables, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_locs=torch.tensor(query_start_locs, dtype=torch.int32, device=dev),
            kernel_backend=self.kernel_backend,
        )
        if dev.type == "cpu" and not use_triton(dev, self.kernel_backend):
            # Which cache slots each sequence reads, planned once for all layers.
            meta.cpu_plan = plan_attention(block_tables, seq_lens, query_start_locs, bs)
        meta.lora = self._lora_batch(sched)
        tap_layers = frozenset([layer for _, layers in tap_rows.values() for layer in layers]
                               + [t for *_, taps in prompt_rows.values() for t in taps])
        t = self.profiler.add("prepare", t)
        hidden, taps = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev),
                                  self.kv_caches, meta, tap_layers)
        if len(logit_rows) < hidden.shape[0]:
            hidden = hidden.index_select(0, torch.tensor(logit_rows, device=dev, dtype=torch.long))
        logits = self.model.compute_logits(hidden)
        # Only the rows that asked get their taps, copied out so the step's buffers can go.
        seq_taps = {seq_id: {layer: _widen(taps[layer][row]) for layer in layers}
                    for seq_id, (row, layers) in tap_rows.items()}
        prompt_taps = {seq_id: (start, {t: _widen(taps[t][a:b]) for t in wanted})
                       for seq_id, (a, b, start, wanted) in prompt_rows.items()}
        self.profiler.add("model", t)
        return ModelOutput(logits=logits, logit_seq_ids=logit_seq_ids, taps=seq_taps, prompt_taps=prompt_taps)


def _widen(x: torch.Tensor) -> torch.Tensor:
    """A tap copied out of the step's buffers, at least float32 (float64 stays: oracle tests)."""
    return x.clone() if x.dtype == torch.float64 else x.float().clone()
