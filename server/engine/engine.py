"""LLMEngine: the synchronous core. `step()` = schedule -> run -> sample -> postprocess.

Testable without HTTP. Requests come in as token ids + SamplingParams; each step
returns SequenceDelta records (new tokens, text, logprobs, finish reason). It is not
thread-safe: AsyncEngine drives it from one thread.
"""
from __future__ import annotations

import hashlib
import time

import torch

from adapters.peft_format import AdapterError, LoRAWeights
from adapters.registry import AdapterRegistry
from server.config import EngineConfig
from server.engine.kv_cache import KVCacheManager
from server.engine.messages import SequenceDelta
from server.engine.runner import ModelRunner
from server.engine.sampler import sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import Request, SamplingParams, Sequence, next_seq_id
from server.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, held_back_chars
from server.models.default_model import resolve_model
from server.models.llama import FINAL_NORM_TAP
from server.models.loader import load_model


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
    if name == "auto":
        # NOTE: bf16 matmuls are slow on AVX2 CPUs; float32 there, bf16 on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _seed_for(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LLMEngine:
    """Owns the model runner, KV manager, scheduler and all live requests."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        model = load_model(self.model_dir, self.dtype, self.device)
        self.model_config = model.config
        self.tokenizer = Tokenizer(self.model_dir)
        cache = config.cache
        self.block_size = cache.block_size
        self.num_blocks = cache.num_kv_blocks or self._auto_num_blocks()
        self.max_model_len = min(config.scheduler.max_model_len, self.model_config.max_position_embeddings)
        self.kv = KVCacheManager(self.num_blocks, self.block_size, cache.enable_prefix_caching,
                                 self.model_config.max_sliding_window)
        self.adapters = AdapterRegistry(self.model_config, config.lora.max_loras, config.lora.max_lora_rank,
                                        self.device, self.dtype)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.adapters)
        self.runner = ModelRunner(model, self.num_blocks, self.block_size, self.device, self.dtype,
                                  config.kernel_backend, self.adapters)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self._rng = torch.Generator().manual_seed(config.seed)
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
        """Queue a generation. `method` (server.methods.base.LogitMethod) rewrites its scores."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id}")
        self.check_request(len(prompt_token_ids), params, method.streams_per_output if method else 1)
        if adapter_id and self.adapters.by_id(adapter_id) is None:
            raise RequestError(f"adapter id {adapter_id} is not loaded", "model", status=404)
        if method is not None:
            method.prepare(self)
        request = Request(request_id, list(prompt_token_ids), params, adapter_id, time.monotonic(), method=method)
        self.num_prompt_tokens += len(prompt_token_ids)
        request.tap_layers = tuple(dict.fromkeys(tap_layers + (method.tap_layers if method else ())))
        seq = self._new_sequence(request, 0, list(prompt_token_ids))
        self.requests[request_id] = request
        self.scheduler.add(seq)
        if method is not None:
            method.attach(self, seq)
        return request

    def add_score_request(self, request_id: str, token_ids: list[int], adapter_id: int) -> Request:
        """Queue a reward-model scoring pass: prefill `token_ids` under the RM adapter; the step
        that completes it emits one delta with extra={"score": [...]} (the score head at the
        last position, as HF's sequence classifiers read it)."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id}")
        entry = self.adapters.by_id(adapter_id)
        if entry is None or "score.weight" not in entry.weights.extra:
            raise RequestError(f"adapter id {adapter_id} is not a loaded reward model", "reward_model", 404)
        params = SamplingParams(max_tokens=0, temperature=0.0)
        self.check_request(len(token_ids), params)
        request = Request(request_id, list(token_ids), params, adapter_id, time.monotonic(), kind="score",
                          tap_layers=(FINAL_NORM_TAP,))
        self.num_prompt_tokens += len(token_ids)
        self.requests[request_id] = request
        self.scheduler.add(self._new_sequence(request, 0, list(token_ids)))
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        seq = Sequence(next_seq_id(), request, index, token_ids, len(request.prompt_token_ids))
        seq.tap_layers = request.tap_layers
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
            seq.generator = torch.Generator().manual_seed(_seed_for(seed, index))
        seq.detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        request.sequences.append(seq)
        self.seqs[seq.seq_id] = seq
        return seq

    def add_shadow(self, primary: Sequence, adapter_id: int, fork_from: Sequence | None = None) -> Sequence:
        """Give `primary` a lockstep twin under another adapter: it is fed every token the
        primary samples, produces its own logits, and is never an output. `fork_from` shares
        an existing shadow's blocks (n > 1 children)."""
        shadow = Sequence(next_seq_id(), primary.request, primary.index, list(primary.token_ids),
                          primary.num_prompt_tokens, adapter_override=adapter_id, is_shadow=True)
        primary.shadow = shadow
        self.seqs[shadow.seq_id] = shadow
        if fork_from is None:
            self.scheduler.add(shadow)
        else:
            self.kv.fork(fork_from, shadow)
            self.scheduler.add_running(shadow)
        return shadow

    def _finish_sequence(self, seq: Sequence, reason: str) -> None:
        for s in (seq, seq.shadow):
            if s is not None and not s.is_finished:
                s.finish_reason = reason
                self.scheduler.finish(s)

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        for seq in request.sequences:
            self.seqs.pop(seq.seq_id, None)
            if seq.shadow is not None:
                self.seqs.pop(seq.shadow.seq_id, None)
        if request.method is not None:
            request.method.detach(request)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its blocks (client went away)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.sequences:
            self._finish_sequence(seq, "abort")
        self._forget(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step ------------------------------------------------------------------
    def step(self) -> list[SequenceDelta]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        out = self.runner.execute(sched)
        self.scheduler.on_step_done(sched, self.seqs)
        seqs = [self.seqs[i] for i in out.logit_seq_ids]
        scored = [self._finish_score(seq, out.taps[seq.seq_id]) for seq in seqs if seq.request.kind == "score"]
        seqs, logits = self._adjust(seqs, out.logits, out.taps)
        if not seqs:
            return scored
        rows: list[int] = []
        for row, seq in enumerate(list(seqs)):
            if seq.request.params.n > 1 and not seq.is_forked:
                seq.is_forked = True
                for child in self._fork_children(seq):
                    seqs.append(child)
                    rows.append(row)
        if rows:
            logits = torch.cat([logits, logits[torch.tensor(rows)]], dim=0)
        tokens, logprobs = sample(logits, seqs)
        deltas = [self._append_token(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, logprobs)]
        for seq, delta in zip(seqs, deltas):
            if seq.seq_id in out.taps and seq.request.method is None:
                delta.extra = {"taps": out.taps[seq.seq_id]}
            if delta.request_finished and seq.request.method is not None:
                delta.extra = {"alignment": {seq.request.method.name: seq.request.method.report(seq.request)}}
        return scored + deltas

    @torch.inference_mode()
    def _adjust(self, seqs: list[Sequence], logits: torch.Tensor,
                taps: dict[int, dict[int, torch.Tensor]]) -> tuple[list[Sequence], torch.Tensor]:
        """Rows to sample and their scores: plain rows as they are, method rows as each
        request's method rewrites them (a method may hold a row back, e.g. a GenARM
        primary whose shadow has not caught up)."""
        plain = [row for row, seq in enumerate(seqs) if seq.request.kind == "generate" and seq.request.method is None]
        groups: dict[str, list[int]] = {}
        for row, seq in enumerate(seqs):
            if seq.request.method is not None:
                groups.setdefault(seq.request.request_id, []).append(row)
        if not groups and len(plain) == len(seqs):
            return seqs, logits
        out_seqs = [seqs[r] for r in plain]
        parts = [logits[torch.tensor(plain, dtype=torch.long, device=logits.device)]]
        for rows in groups.values():
            group = [seqs[r] for r in rows]
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            ready, scores = group[0].request.method.adjust(group, logits[index], taps)
            out_seqs.extend(ready)
            parts.append(scores)
        return out_seqs, torch.cat(parts, dim=0)

    def _finish_score(self, seq: Sequence, taps: dict[int, torch.Tensor]) -> SequenceDelta:
        head = self.adapters.by_id(seq.adapter_id).weights.extra["score.weight"]
        hidden = taps[FINAL_NORM_TAP]
        score = (hidden.to(head.device, head.dtype) @ head.T).float().tolist()
        seq.finish_reason = "stop"
        self.scheduler.finish(seq)
        self._forget(seq.request)
        return SequenceDelta(request_id=seq.request.request_id, index=0, new_token_ids=[], text="",
                             logprobs=None, finish_reason="stop", num_prompt_tokens=seq.num_tokens,
                             num_output_tokens=0, request_finished=True, extra={"score": score})

    def _fork_children(self, parent: Sequence) -> list[Sequence]:
        children = []
        for index in range(1, parent.request.params.n):
            child = self._new_sequence(parent.request, index, list(parent.token_ids))
            child.is_forked = True  # only the first sequence of a request forks
            self.kv.fork(parent, child)
            self.scheduler.add_running(child)
            if parent.shadow is not None:
                self.add_shadow(child, parent.shadow.adapter_id, fork_from=parent.shadow)
            children.append(child)
        return children

    def _append_token(self, seq: Sequence, token: int, logprob) -> SequenceDelta:
        params = seq.request.params
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if seq.shadow is not None:
            seq.shadow.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        finish = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            finish = "stop"
        else:
            prev_len = len(seq.output_text)
            seq.output_text += seq.detok.add(token)
            if params.stop:
                idx = find_stop(seq.output_text, params.stop, prev_len)
                if idx != -1:
                    seq.output_text = seq.output_text[:idx]
                    finish = "stop"
        if finish is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        hold = held_back_chars(seq.output_text, params.stop) if finish is None and params.stop else 0
        end = max(seq.num_sent_chars, len(seq.output_text) - hold)
        text = seq.output_text[seq.num_sent_chars:end]
        seq.num_sent_chars = end
        request = seq.request
        request_finished = False
        if finish is not None:
            self._finish_sequence(seq, finish)
            request.num_finished += 1
            request_finished = request.num_finished == params.n
            if request_finished:
                self._forget(request)
        return SequenceDelta(
            request_id=request.request_id, index=seq.index, new_token_ids=[token], text=text,
            logprobs=[logprob] if logprob is not None else None, finish_reason=finish,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            request_finished=request_finished,
        )

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
        }
