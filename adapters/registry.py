"""Known LoRA adapters and the device slots they are stacked into for the batched kernel.

In: `LoRAWeights` (host tensors from `adapters.peft_format`, loaded off the engine thread) via
`add`; per-sequence `acquire`/`release` from the scheduler. Out: per (layer, module) stacks
`lora_a [max_loras, in, stack_rank]`, `lora_b [max_loras, stack_rank, out]`, `scales [max_loras]`
for `kernels.dispatch.lora_apply`, and `slot_of(adapter_id)` for each batch row's index.
`stack_rank` grows with the largest adapter made resident (in steps of RANK_STEP, at most
`--max-lora-rank`) rather than starting at `max_rank`: see `_fit_rank`.

Adapter ids are ints >= 1, never reused; id 0 is the base model (slot -1: no delta). A slot holds
one resident adapter; residents with refcount 0 stay cached and are evicted least recently used
first when a new adapter needs a slot. This module does not read files, schedule sequences or
serve HTTP.

NOTE: only the engine thread calls into a registry, so it takes no locks.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.peft_format import AdapterError, LoRAWeights, module_shape
from server.models.config import ModelConfig

BASE_ADAPTER_ID = 0
RANK_STEP = 8  # stacks grow by whole steps of ranks, so mixed small ranks do not regrow them


@dataclass
class RegisteredAdapter:
    """A known adapter: its weights on the host and its residency state."""

    name: str
    adapter_id: int
    weights: LoRAWeights
    refcount: int = 0
    slot: int = -1  # device slot while resident, else -1


def stack_dtype(requested: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype LoRA stacks are kept in (`--lora-dtype`).

    "auto" is the model's dtype (what vLLM keeps them in). On CPU that holds where our C++ BGMV
    runs (it widens 16-bit stacks in registers, and with the decode stack a step's adapter cost
    is mostly the stacks' bytes: 16 adapters kept 0.72 / 0.76x of base with bf16 stacks against
    0.69 / 0.61x with float32 ones in two pairs of interleaved runs,
    bench/results/lora_throughput_cpu_2026-12-07_stack_*); elsewhere on CPU it is float32, since
    the torch route would widen 16-bit stacks with a copy of each row's A and B per call.

    Raises:
        ValueError: an explicit dtype other than float32 or the model's.
    """
    if requested != "auto":
        dtype = getattr(torch, requested)
        if dtype not in (torch.float32, model_dtype):
            raise ValueError(f"--lora-dtype {requested}: LoRA stacks are float32 or the model's dtype "
                             f"({str(model_dtype).removeprefix('torch.')})")
        return dtype
    if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        from kernels import cpu_ext

        return model_dtype if cpu_ext.load() is not None else torch.float32
    return model_dtype


class AdapterRegistry:
    """Named adapters, refcounts and an LRU set of device-resident slots."""

    def __init__(self, model_config: ModelConfig, max_loras: int = 8, max_rank: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_loras <= 0 or max_rank <= 0:
            raise ValueError(f"max_loras and max_rank must be positive (got {max_loras}, {max_rank})")
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype  # the stacks' (see stack_dtype)
        self._by_name: dict[str, RegisteredAdapter] = {}
        self._by_id: dict[int, RegisteredAdapter] = {}
        self._next_id = BASE_ADAPTER_ID + 1
        self._slots: list[int | None] = [None] * max_loras  # adapter id per slot
        # Resident adapter ids, least recently used first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        # NOTE: a stack is allocated the first time a resident adapter targets its module and
        # kept afterwards; slot rows of adapters that do not target it are zero.
        self._stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._num_targeting: dict[tuple[int, str], int] = {}  # resident adapters per module
        self.stack_rank = 0  # ranks per slot in every stack (_fit_rank)
        # Bumped whenever what `stacks` returns may change (a slot loaded or cleared: a module
        # gains or loses its last targeting adapter, a stack is allocated or grown). Slot contents change
        # in place, so callers may keep what `stacks` gave them while the version holds
        # (server.models.cpu_stack does, per step).
        self.layout_version = 0
        self.num_loads = 0  # adapters copied into a device slot
        self.num_evictions = 0  # of those, loads that displaced an idle resident adapter
        self.num_unloads = 0  # adapters removed from the registry

    # ----- known adapters -----

    def add(self, name: str, weights: LoRAWeights) -> int:
        """Register host weights under `name` (no device work); returns the new adapter id.

        Raises:
            AdapterError: 400 if the name is taken or the rank exceeds `max_rank`.
        """
        if not name:
            raise AdapterError("adapter name must be non-empty", status=400, param="lora_name")
        if name in self._by_name:
            raise AdapterError(f"adapter {name!r} is already loaded", status=400, param="lora_name")
        if weights.rank > self.max_rank:
            raise AdapterError(f"rank {weights.rank} exceeds --max-lora-rank {self.max_rank}",
                               status=400, param="lora_path")
        entry = RegisteredAdapter(name, self._next_id, weights)
        self._next_id += 1
        self._by_name[name] = entry
        self._by_id[entry.adapter_id] = entry
        return entry.adapter_id

    def remove(self, name: str) -> None:
        """Forget an adapter and free its slot.

        Raises:
            AdapterError: 404 if `name` is unknown; 409 Conflict if sequences still use it. 409
                (not 400) because the request is valid and can succeed later, once those
                sequences finish: the caller may retry, or abort them first.
        """
        entry = self._by_name.get(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} is not loaded", status=404, param="lora_name")
        if entry.refcount > 0:
            raise AdapterError(f"adapter {name!r} is in use by {entry.refcount} sequence(s); "
                               "retry once they finish", status=409, param="lora_name")
        if entry.slot >= 0:
            self._clear_slot(entry)
        del self._by_name[name], self._by_id[entry.adapter_id]
        self.num_unloads += 1

    def get(self, name: str) -> RegisteredAdapter | None:
        """The adapter registered as `name`, or None."""
        return self._by_name.get(name)

    def by_id(self, adapter_id: int) -> RegisteredAdapter | None:
        """The adapter with `adapter_id`, or None (also for the base id 0)."""
        return self._by_id.get(adapter_id)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._by_name)

    # ----- residency -----

    def acquire(self, adapter_id: int) -> bool:
        """Count one more user of `adapter_id` and make it resident.

        Loads into the lowest free slot, else evicts the least recently used resident adapter
        with refcount 0. Returns False (and changes nothing) when every slot is held by an
        adapter in use, so the scheduler can wait. The base id 0 always succeeds.

        Raises:
            AdapterError: 404 if the id is unknown (e.g. removed while the request waited).
        """
        if adapter_id == BASE_ADAPTER_ID:
            return True
        entry = self._entry(adapter_id)
        if entry.slot < 0:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load(entry, slot)
        entry.refcount += 1
        self._lru.move_to_end(adapter_id)
        return True

    def release(self, adapter_id: int) -> None:
        """Drop one user; the adapter stays resident (evictable) when none remain."""
        if adapter_id == BASE_ADAPTER_ID:
            return
        entry = self._entry(adapter_id)
        if entry.refcount <= 0:
            raise RuntimeError(f"release of adapter {entry.name!r} without a matching acquire")
        entry.refcount -= 1
        # Last use is now, so an adapter that just finished is the last to be evicted.
        self._lru.move_to_end(adapter_id)

    def slot_of(self, adapter_id: int) -> int:
        """Kernel index for rows of `adapter_id`: its slot, or -1 for the base model."""
        if adapter_id == BASE_ADAPTER_ID:
            return -1
        entry = self._entry(adapter_id)
        if entry.slot < 0:
            raise RuntimeError(f"adapter {entry.name!r} is not resident; acquire it first")
        return entry.slot

    def stacks(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(lora_a, lora_b, scales) for (layer, module), or None when no resident adapter targets it.

        NOTE: a module's stacks are allocated when a resident adapter first targets it, and the
        answer turns None when none does any more; `layout_version` changes with both.
        """
        if not self._num_targeting.get((layer, module)):
            return None
        return self._stacks[(layer, module)]

    def resident(self) -> dict[int, int]:
        """slot -> adapter id for occupied slots."""
        return {slot: aid for slot, aid in enumerate(self._slots) if aid is not None}

    # ----- internals -----

    def _entry(self, adapter_id: int) -> RegisteredAdapter:
        entry = self._by_id.get(adapter_id)
        if entry is None:
            raise AdapterError(f"adapter id {adapter_id} is not loaded", status=404, param="model")
        return entry

    def _free_slot(self) -> int | None:
        """Lowest empty slot, else the slot of the least recently used idle adapter (evicted)."""
        for slot, aid in enumerate(self._slots):
            if aid is None:
                return slot
        for aid in self._lru:
            victim = self._by_id[aid]
            if victim.refcount == 0:
                slot = victim.slot
                self._clear_slot(victim)
                self.num_evictions += 1
                return slot
        return None

    def _load(self, entry: RegisteredAdapter, slot: int) -> None:
        self.layout_version += 1  # first: a load that fails half-way has changed the layout too
        weights = entry.weights
        self._fit_rank(weights.rank)
        for (layer, module), (a, b) in weights.weights.items():
            lora_a, lora_b, scales = self._stack(layer, module)
            rank = a.shape[1]
            # Ranks past the adapter's stay zero, so padding to stack_rank adds exact zeros.
            lora_a[slot, :, :rank].copy_(a)
            lora_b[slot, :rank, :].copy_(b)
            scales[slot] = weights.scaling_of(layer, module)
            self._num_targeting[(layer, module)] = self._num_targeting.get((layer, module), 0) + 1
        entry.slot = slot
        self._slots[slot] = entry.adapter_id
        self._lru[entry.adapter_id] = None
        self.num_loads += 1

    def _clear_slot(self, entry: RegisteredAdapter) -> None:
        self.layout_version += 1
        slot = entry.slot
        for key in entry.weights.weights:
            lora_a, lora_b, scales = self._stacks[key]
            lora_a[slot].zero_()
            lora_b[slot].zero_()
            scales[slot] = 0.0
            self._num_targeting[key] -= 1
        self._slots[slot] = None
        del self._lru[entry.adapter_id]
        entry.slot = -1

    def _fit_rank(self, rank: int) -> None:
        """Grow every stack to hold `rank` ranks per slot (copying what they hold), if it does not.

        Why not allocate `max_rank` ranks up front: a step reads only the ranks in use, but the
        slots lie `stack_rank` rows apart, so rank-8 adapters in max_rank-64 stacks (the default)
        spread a step's reads over 8x the memory (more pages and DRAM rows opened for the same
        bytes): 16 rank-8 adapters' deltas for a decode step of SmolLM2-135M's shapes with cold
        caches took 7.4 / 7.6 ms with slots 64 ranks apart vs 6.6 / 6.9 ms 8 apart (2-core AMX
        Xeon, bench/results/lora_cpu_step_cold_after_r{1,2}_2026-12-07.*). The memory held shrinks
        by the same 8x. Growth copies the stacks once, on the engine thread; stacks never shrink.
        Swapping a rank-64 adapter in under 16 streams of rank-8 ones: ITL p99 near the swap 3.14x
        of without, against 2.84x when the stacks held 64 ranks from the start
        (bench/results/lora_swap_cpu_2026-12-07_session4_grow64*).
        """
        needed = min(self.max_rank, -(-rank // RANK_STEP) * RANK_STEP)
        if needed <= self.stack_rank:
            return
        # Every grown stack is built before any is swapped in: an allocation that fails half-way
        # leaves the stacks and stack_rank as they were, not some stacks at each rank.
        grown = {}
        for key, (lora_a, lora_b, scales) in self._stacks.items():
            grown_a, grown_b = self._new_stack(key, needed)
            grown_a[:, :, :self.stack_rank].copy_(lora_a)
            grown_b[:, :self.stack_rank].copy_(lora_b)
            grown[key] = (grown_a, grown_b, scales)
        self._stacks.update(grown)
        self.stack_rank = needed

    def _new_stack(self, key: tuple[int, str], ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (lora_a, lora_b) holding `ranks` ranks per slot for the module of `key`."""
        in_f, out_f = module_shape(self.model_config, key[1])
        kw = dict(device=self.device, dtype=self.dtype)
        if self.device.type == "cpu":
            # NOTE: on CPU lora_a is a [max_loras, in, stack_rank] view of rank-major storage,
            # so a slot's first r ranks are one contiguous block for the gathered paths (C++ and torch).
            lora_a = torch.zeros(self.max_loras, ranks, in_f, **kw).transpose(1, 2)
        else:
            lora_a = torch.zeros(self.max_loras, in_f, ranks, **kw)
        return lora_a, torch.zeros(self.max_loras, ranks, out_f, **kw)

    def _stack(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (layer, module)
        if key not in self._stacks:
            # Scales stay float32: the kernel accumulates in float32.
            self._stacks[key] = (*self._new_stack(key, self.stack_rank),
                                 torch.zeros(self.max_loras, device=self.device, dtype=torch.float32))
        return self._stacks[key]
