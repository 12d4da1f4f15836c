"""LLMEngine: the synchronous core. `step()` = schedule -> run -> adjust -> sample -> process.

Testable without HTTP. Requests come in as token ids + SamplingParams; each step returns
SequenceDelta records (new tokens, text, logprobs, finish reason). Sequence operations live in
server/engine/lifecycle.py, text in server/engine/output.py; a request's method (server/methods)
adjusts its rows or drives it through those primitives, so nothing here knows any method.
It is not thread-safe: AsyncEngine drives it from one thread.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from adapters.peft_format import AdapterError, LoRAWeights
from adapters.registry import AdapterRegistry, stack_dtype
from server.config import EngineConfig
from server.engine.constraints import constrain
from server.engine.kv_cache import KVCacheManager
from server.engine.lifecycle import SequenceLifecycle
from server.engine.messages import SequenceDelta
from server.engine.output import OutputProcessor
from server.engine.profiler import StepProfiler
from server.engine.prompt_logprobs import prompt_logprobs
from server.engine.runner import ModelRunner
from server.engine.sampler import sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, SamplingParams, Sequence
from server.engine.tokenizer import Tokenizer
from server.models import cpu_stack
from server.models.default_model import resolve_model
from server.models.linear import cpu_flags, has_native_bf16, prepare_linears
from server.models.llama import FINAL_NORM_TAP
from server.models.loader import load_model

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as asked (HTTP 400 unless `status` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs and on CPUs that multiply bf16 in hardware (AMX, AVX512-BF16);
    float32 elsewhere, where bf16 matmuls are emulated and slower than float32."""
    if name == "auto":
        if device.type == "cuda" or has_native_bf16():
            return torch.bfloat16
        return torch.float32
    # NOTE: float64 is for oracle tests (exact method arithmetic), not a serving option.
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


class LLMEngine:
    """Owns the model runner, KV manager, scheduler and all live requests."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        model = load_model(self.model_dir, self.dtype, self.device)
        self.linears = prepare_linears(model, config.quantization)
        if config.kernel_backend == "auto" and config.decode_stack:
            model.cpu_stack = cpu_stack.build(model)
            self.linears["decode_stack"] = "C++" if model.cpu_stack is not None else "python"
        isa = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"} & cpu_flags())
        log.info("dtype %s (asked %s; CPU has %s), quantization %s, linears %s", self.dtype, config.dtype,
                 ",".join(isa) or "no AVX", config.quantization, self.linears)
        self.model_config = model.config
        self.tokenizer = Tokenizer(self.model_dir)
        cache = config.cache
        self.block_size = cache.block_size
        self.num_blocks = cache.num_kv_blocks or self._auto_num_blocks()
        self.max_model_len = min(config.scheduler.max_model_len, self.model_config.max_position_embeddings)
        self.kv = KVCacheManager(self.num_blocks, self.block_size, cache.enable_prefix_caching,
                                 self.model_config.max_sliding_window)
        self.adapters = AdapterRegistry(self.model_config, config.lora.max_loras, config.lora.max_lora_rank,
                                        self.device, stack_dtype(config.lora.lora_dtype, self.dtype, self.device))
        self.scheduler = Scheduler(config.scheduler, self.kv, self.adapters)
        self.profiler = StepProfiler()
        self.runner = ModelRunner(model, self.num_blocks, self.block_size, self.device, self.dtype,
                                  config.kernel_backend, self.adapters, self.profiler)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.lifecycle = SequenceLifecycle(self.kv, self.scheduler, self.outputs, config.seed)
        self.seqs: dict[int, Sequence] = self.lifecycle.seqs
        self.num_prompt_tokens = 0  # of every request added, scoring included
        self.num_generation_tokens = 0  # every token sampled, aborted requests included

    def _auto_num_blocks(self) -> int:
        per_block = ModelRunner.bytes_per_block(self.model_config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.cache.memory_fraction)
        else:
            budget = self.config.cache.cpu_kv_bytes
        return max(2, budget // per_block)

    # ---- requests ------------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int, params: SamplingParams, streams_per_output: int = 1) -> None:
        """Raise RequestError for requests that could never run (`streams_per_output`: 2 when
        every output has a shadow, as with GenARM)."""
        if num_prompt_tokens == 0:
            raise RequestError("the prompt is empty", "prompt")
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({num_prompt_tokens} in the prompt, {params.max_tokens} "
                f"in the completion). Please reduce the length of the prompt or completion.",
                "max_tokens")
        # A single sequence must fit the whole pool, or preemption could never make room.
        needed = self.kv.num_blocks_needed(total) * params.n * streams_per_output
        if needed > self.num_blocks - 1:
            raise RequestError(f"request needs {needed} KV blocks but the cache holds {self.num_blocks - 1}",
                               "max_tokens")

    # ---- adapters ------------------------------------------------------------------
    def add_adapter(self, name: str, weights: LoRAWeights) -> int:
        """Register an adapter loaded off-thread; it becomes resident when first used."""
        return self.adapters.add(name, weights)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter. Raises AdapterError 404 if unknown, 409 while requests use it."""
        entry = self.adapters.get(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} is not loaded", status=404, param="lora_name")
        # Shadows (GenARM) and score requests use adapters the request's `model` does not name.
        users = len({s.request.request_id for s in self.seqs.values()
                     if s.adapter_id == entry.adapter_id and not s.is_finished})
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {users} request(s); retry when they finish",
                               status=409, param="lora_name")
        self.adapters.remove(name)

    def resolve_adapter(self, name: str | None, role: str | None = None, param: str = "model") -> int:
        """Adapter id for an adapter name (None: base model).

        role=None: an adapter that generates text (anything but a reward model);
        role="rm"/"arm": exactly that role, for scoring and GenARM guidance.
        """
        if name is None:
            return 0
        entry = self.adapters.get(name)
        if entry is None:
            raise RequestError(f"The model `{name}` does not exist.", param, status=404)
        if role is None and entry.weights.role == "rm":
            raise RequestError(f"`{name}` is a reward-model adapter and cannot generate text", param)
        if role == "rm" and entry.weights.role != "rm":
            raise RequestError(f"`{name}` is a {entry.weights.role} adapter, not a reward model "
                               f"(it has no score head)", param)
        return entry.adapter_id

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: int = 0, tap_layers: tuple[int, ...] = (), method=None) -> Request:
        """Queue a generation. `method` (server.methods.base.LogitMethod or a SearchMethod)
        adjusts its scores or drives it."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id}")
        self.check_request(len(prompt_token_ids), params, method.streams_per_output if method else 1)
        if adapter_id and self.adapters.by_id(adapter_id) is None:
            raise RequestError(f"adapter id {adapter_id} is not loaded", "model", status=404)
        if method is not None:
            method.prepare(self)
        if params.prompt_logprobs is not None:
            # Prompt logprobs read the final-norm states and the method's taps at every position.
            wanted = (FINAL_NORM_TAP,) + (method.tap_layers if method is not None else ())
            params = dataclasses.replace(params, prompt_taps=tuple(dict.fromkeys(params.prompt_taps + wanted)))
        request = Request(request_id, list(prompt_token_ids), params, adapter_id, time.monotonic(), method=method)
        request.tap_layers = tuple(dict.fromkeys(tap_layers + (method.tap_layers if method else ())))
        self.num_prompt_tokens += len(prompt_token_ids)
        seq = self.lifecycle.new_output(request, 0, list(prompt_token_ids))
        self.requests[request_id] = request
        self.scheduler.add(seq)
        if method is not None:
            method.attach(self, seq)
        return request

    def add_score_request(self, request_id: str, token_ids: list[int], adapter_id: int) -> Request:
        """Queue a reward-model scoring pass: prefill `token_ids` under the RM adapter; the step
        that completes it emits one delta with extra={"score": [...]} (the score head at the
        last position, as HF's sequence classifiers read it)."""
        from server.methods.score import ScoreRequest

        return self.add_request(request_id, list(token_ids), SamplingParams(max_tokens=0, temperature=0.0),
                                adapter_id, method=ScoreRequest(adapter_id))

    def add_shadow(self, primary: Sequence, adapter_id: int, fork_from: Sequence | None = None) -> Sequence:
        """A lockstep twin of `primary` under another adapter (see SequenceLifecycle.add_shadow)."""
        return self.lifecycle.add_shadow(primary, adapter_id, fork_from)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks (client went away)."""
        request = self.requests.get(request_id)
        if request is not None:
            self._forget(request)

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.lifecycle.forget(request)
        if request.method is not None:
            request.method.detach(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or any(r.method is not None and r.method.is_driving
                                                    for r in self.requests.values())

    # ---- the step ------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        """schedule -> run -> adjust (methods) -> constrain -> sample -> process outputs -> advance methods."""
        deltas: list[SequenceDelta] = []
        prof = self.profiler
        t = prof.now()
        sched = self.scheduler.schedule()
        t = prof.add("schedule", t)
        if not sched.is_empty:
            out = self.runner.execute(sched)  # charges "prepare" and "model"
            t = prof.now()
            self.scheduler.on_step_done(sched, self.seqs)
            self._collect_prompt_taps(out.prompt_taps)
            seqs, logits = self._adjust([self.seqs[i] for i in out.logit_seq_ids], out.logits, out.taps)
            seqs, logits = self._fork_outputs(seqs, logits)
            if seqs:
                logits = constrain(logits, seqs)
                tokens, logprobs = sample(logits, seqs)
                t = prof.add("sample", t)
                prof.num_rows += len(seqs)
                for seq, token, lp in zip(seqs, tokens, logprobs):
                    delta = self._on_sampled(seq, token, lp)
                    if delta is not None:
                        if seq.seq_id in out.taps and seq.request.method is None:
                            delta.extra = {"taps": out.taps[seq.seq_id]}
                        if seq.prompt_tap_rows:
                            delta.extra = {**(delta.extra or {}), **self._prompt_outputs(seq)}
                        deltas.append(delta)
            prof.step_done()
        for request in [r for r in self.requests.values() if r.method is not None]:
            deltas.extend(request.method.advance(request))
        for delta in deltas:
            request = self.requests.get(delta.request_id)
            if delta.request_finished and request is not None:
                if request.method is not None:
                    # Methods may sample far more than they return (best-of's candidates, a
                    # search's branches): usage counts every token generated for the request.
                    delta.extra = {**(delta.extra or {}), **request.method.final_extra(request),
                                   "num_generated_tokens": request.num_generated}
                self._forget(request)
        prof.add("output", t)
        return deltas

    def _prompt_outputs(self, seq: Sequence) -> dict:
        """A finished prompt's taps for its first delta: as prompt logprobs when the request
        asked for those, else the raw hidden states (datastore builds)."""
        taps = {t: torch.cat(rows) for t, rows in seq.prompt_tap_rows.items()}
        seq.prompt_tap_rows = {}
        if seq.params.prompt_logprobs is not None:
            return {"prompt_logprobs": prompt_logprobs(self.runner.model, seq, taps, seq.params.prompt_logprobs)}
        return {"prompt_taps": taps}

    def _collect_prompt_taps(self, chunks: dict[int, tuple[int, dict[int, torch.Tensor]]]) -> None:
        """Prompt-position taps, in prompt order; a prompt recomputed after preemption starts
        again at position 0 and replaces what it had."""
        for seq_id, (start, taps) in chunks.items():
            seq = self.seqs.get(seq_id)
            if seq is None:
                continue
            if start == 0:
                seq.prompt_tap_rows = {}
            for t, rows in taps.items():
                seq.prompt_tap_rows.setdefault(t, []).append(rows)

    @torch.inference_mode()
    def _adjust(self, seqs: list[Sequence], logits: torch.Tensor,
                taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list[Sequence], torch.Tensor]:
        """Rows to sample and their scores: plain rows as they are, method rows as each
        request's method rewrites them (a method may hold a row back, e.g. a GenARM
        primary whose shadow has not caught up, or consume it, e.g. a search's readout)."""
        plain = [row for row, seq in enumerate(seqs) if seq.request.method is None]
        groups: dict[str, list[int]] = {}
        for row, seq in enumerate(seqs):
            if seq.request.method is not None:
                groups.setdefault(seq.request.request_id, []).append(row)
        if not groups:
            return seqs, logits
        out_seqs = [seqs[r] for r in plain]
        parts = [logits[torch.tensor(plain, dtype=torch.long, device=logits.device)]]
        # Requests whose methods share a class are adjusted in one call (e.g. one faiss search
        # for every kNN-LM row of the step).
        by_class: dict[type, list] = {}
        for rows in groups.values():
            group = [seqs[r] for r in rows]
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            method = group[0].request.method
            by_class.setdefault(type(method), []).append((method, group, logits[index]))
        for cls, items in by_class.items():
            for ready, scores in cls.adjust_batch(items, taps):
                out_seqs.extend(ready)
                parts.append(scores)
        return out_seqs, torch.cat(parts, dim=0)

    def _fork_outputs(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """n > 1: at a request's first sample its output forks into n (copy-on-write after one
        prefill); each child samples from the same row with its own generator."""
        rows: list[int] = []
        out = list(seqs)
        for row, seq in enumerate(seqs):
            if seq.role == "output" and seq.request.params.n > 1 and not seq.is_forked:
                seq.is_forked = True
                for child in self.lifecycle.fork(seq, seq.request.params.n - 1, role="output"):
                    child.is_forked = True
                    if seq.shadow is not None:
                        self.lifecycle.add_shadow(child, seq.shadow.adapter_id, fork_from=seq.shadow)
                    out.append(child)
                    rows.append(row)
        if rows:
            logits = torch.cat([logits, logits[torch.tensor(rows)]], dim=0)
        return out, logits

    def _on_sampled(self, seq: Sequence, token: int, logprob) -> SequenceDelta | None:
        """An output streams what it may; a work sequence holds its text and pauses when its
        sampling budget is spent or it finishes."""
        self.num_generation_tokens += 1
        seq.request.num_generated += 1
        finish = self.outputs.append(seq, token, logprob)
        if seq.role == "work":
            seq.sample_budget -= 1
            if finish is not None or seq.sample_budget <= 0:
                seq.paused = True
            return None
        return self.lifecycle.emit(seq, [token], self.outputs.release(seq), [logprob] if logprob else [])

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.kv.usage,
            "num_used_blocks": self.kv.pool.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_adapters": len(self.adapters.names()),
            "adapter_loads": self.adapters.num_loads,
            "adapter_unloads": self.adapters.num_unloads,
            "adapter_evictions": self.adapters.num_evictions,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generation_tokens": self.num_generation_tokens,
            "num_steps": self.profiler.lifetime_steps,
            **{f"step_{phase}_seconds": s for phase, s in self.profiler.lifetime_seconds.items()},
        }
