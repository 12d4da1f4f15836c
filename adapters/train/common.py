"""Shared plumbing for the four trainers: options, base resolution, checks, LoRA, metadata.

In: `TrainOptions` from the CLI (or tests). Out: a resolved base model + tokenizer, a LoRA config
or a loaded `--init-adapter`, TRL/transformers training kwargs (float32, no checkpointing, seeded)
and, after training, the PEFT directory plus `alignserve.json`. Every check that can fail on the
user's input runs here *before* a model is loaded. The losses live in sft/dpo/reward/arm.py.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METADATA_FILE = "alignserve.json"
METADATA_FORMAT = "alignserve-adapter/1"
ROLE_TASK_TYPES = {"sft": "CAUSAL_LM", "dpo": "CAUSAL_LM", "arm": "CAUSAL_LM", "rm": "SEQ_CLS"}
# LoRA learning rates, measured on the default model (adapters/train/sft.py's docstring, README).
DEFAULT_LR = {"sft": 1e-3, "dpo": 5e-5, "rm": 1e-4, "arm": 5e-4}
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "vocab_size")


class TrainError(ValueError):
    """A user-facing problem found before (or instead of) training."""


@dataclass(frozen=True)
class LoraOptions:
    """LoRA shape; targets must be projections the server's multi-LoRA kernels handle.

    Defaults follow current LoRA practice (QLoRA, TRL's and PEFT's SFT recipes): every linear
    projection of attention and MLP, r = 16, alpha = 2r. No dropout: on the few-example runs the
    trainer is used for (a fixed Q->A set, a few hundred preference pairs) it only slows fitting.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = SUPPORTED_TARGETS


@dataclass(frozen=True)
class TrainOptions:
    """Flags common to `alignserve train sft|dpo|rm|arm`."""

    data: Path
    output: Path
    base: str | None = None
    init_adapter: Path | None = None
    eval_data: Path | None = None
    lora: LoraOptions = field(default_factory=LoraOptions)
    lr: float | None = None  # None: DEFAULT_LR[role]
    lr_scheduler: str = "cosine"
    warmup: float = 0.1  # < 1: a fraction of the steps (transformers' warmup_steps)
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    seed: int = 0
    logging_steps: int = 5
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class BaseModel:
    """A resolved base: the id recorded in metadata, its local HF dir and a config fingerprint."""

    id: str
    path: Path
    fingerprint: dict[str, Any]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    output: Path
    steps: int
    metrics: dict[str, float]
    loss_history: tuple[float, ...]
    logging_steps: int = 1
    sample: dict[str, str] | None = None  # SFT: a training prompt, its answer, the adapter's greedy output


def summary_lines(result: TrainResult, width: int = 40) -> list[str]:
    """The loss curve (one bar per logged step) and, for SFT, the final greedy sample."""
    lines = [f"loss curve ({result.steps} steps):"]
    top = max(result.loss_history, default=0.0) or 1.0
    every = max(1, result.logging_steps)
    for i, loss in enumerate(result.loss_history):
        # logging_first_step logs step 1, then the Trainer logs every N steps (step 1 only once).
        step = i + 1 if every == 1 else (1 if i == 0 else i * every)
        lines.append(f"  step {step:>5}  {loss:8.4f}  " + "#" * max(1, round(width * loss / top)))
    if result.sample is not None:
        lines += ["greedy sample on a training prompt:", f"  prompt:   {result.sample['prompt']!r}",
                  f"  expected: {result.sample['expected']!r}", f"  got:      {result.sample['output']!r}"]
    return lines


def resolve_base(base: str | None) -> BaseModel:
    """Map `--base` to a local HF dir; the default model is fetched only when `base` is None."""
    from transformers import AutoConfig

    from server.models.default_model import DEFAULT_MODEL_NAME, default_model_dir

    if base is None:
        from server.models.default_model import ensure_default_model
        base_id, path = DEFAULT_MODEL_NAME, Path(ensure_default_model())
    elif (Path(base).expanduser() / "config.json").is_file():
        path = Path(base).expanduser().resolve()
        # The server names the default model by its name, not its cache path.
        base_id = DEFAULT_MODEL_NAME if path == default_model_dir().resolve() else base
    else:
        from server.models.default_model import resolve_model
        try:
            base_id, path = base, Path(resolve_model(base))
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise TrainError(f"--base {base!r}: not a model directory with config.json ({exc})") from None
    config = AutoConfig.from_pretrained(path)
    return BaseModel(base_id, path, fingerprint(config))


def fingerprint(config: Any) -> dict[str, Any]:
    """The config fields that must match between a base and an adapter trained on it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text, key, None) for key in _FINGERPRINT_KEYS}


def check_lora(lora: LoraOptions) -> None:
    """Reject LoRA shapes the server cannot serve."""
    unknown = sorted(set(lora.target_modules) - set(SUPPORTED_TARGETS))
    if not lora.target_modules or unknown:
        raise TrainError(f"--target-modules {unknown or '(empty)'} not supported; choose from {SUPPORTED_TARGETS}")
    if lora.r <= 0 or lora.alpha <= 0:
        raise TrainError(f"--lora-r and --lora-alpha must be positive (got {lora.r}, {lora.alpha})")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing adapter unless asked to."""
    if output.exists() and not output.is_dir():
        raise TrainError(f"--output {output} exists and is not a directory")
    if (output / "adapter_config.json").exists() and not overwrite:
        raise TrainError(f"--output {output} already holds an adapter; pass --overwrite to replace it")


def check_init_adapter(adapter: Path, base: BaseModel, role: str) -> dict[str, Any]:
    """Validate that `adapter` was trained on `base` and fits `role`; returns its adapter_config."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file() or not any(adapter.glob("adapter_model.*")):
        raise TrainError(f"--init-adapter {adapter}: not a PEFT adapter directory "
                         "(needs adapter_config.json + adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    task_type = config.get("task_type")
    if task_type != ROLE_TASK_TYPES[role]:
        raise TrainError(f"--init-adapter {adapter}: task_type {task_type!r} cannot start a {role!r} run "
                         f"(needs {ROLE_TASK_TYPES[role]!r})")
    meta_path = adapter / METADATA_FILE
    if meta_path.is_file():
        recorded = json.loads(meta_path.read_text()).get("base_fingerprint", {})
        diff = {k: (recorded[k], base.fingerprint.get(k)) for k in recorded
                if recorded[k] != base.fingerprint.get(k)}
        if diff:
            raise TrainError(f"--init-adapter {adapter} was trained on a different base than {base.id!r}: "
                             + ", ".join(f"{k} {a} != {b}" for k, (a, b) in diff.items()))
    return config


def load_tokenizer(base: BaseModel) -> Any:
    """The base tokenizer, with a pad token and a chat template (training must match serving)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainError(f"base {base.id!r} has no chat template; training data is chat-formatted")
    vocab = base.fingerprint.get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise TrainError(f"tokenizer has {len(tokenizer)} tokens but the base model only {vocab} embeddings")
    return tokenizer


def prepare_run(opts: TrainOptions, role: str,
                load_examples: Callable[[Path], list[Any]]) -> tuple[list[Any], list[Any] | None, BaseModel, Any]:
    """Every check that can fail before a model loads: data, LoRA flags, output, base, init adapter.

    Returns (examples, eval_examples, base, tokenizer).
    """
    examples = load_examples(opts.data)
    eval_examples = load_examples(opts.eval_data) if opts.eval_data else None
    check_lora(opts.lora)
    check_output(opts.output, opts.overwrite)
    base = resolve_base(opts.base)
    if opts.init_adapter is not None:
        check_init_adapter(opts.init_adapter, base, role)
    return examples, eval_examples, base, load_tokenizer(base)


def load_model(base: BaseModel, role: str, tokenizer: Any, seed: int) -> Any:
    """The base in float32: a causal LM, or (role "rm") a 1-label sequence classifier."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    # Seed before anything is initialised: the RM's new score head and the LoRA A matrices.
    set_seed(seed)
    if role == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    # NOTE: sequence classifiers read the score at the last token that is not pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def attach_adapter(model: Any, opts: TrainOptions, role: str, base: BaseModel) -> tuple[Any, Any]:
    """Either (model, LoraConfig) for TRL to wrap, or (PeftModel from --init-adapter, None)."""
    from peft import LoraConfig, PeftModel

    if opts.init_adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, opts.init_adapter, is_trainable=True)
        except (RuntimeError, ValueError) as exc:
            raise TrainError(f"--init-adapter {opts.init_adapter} does not fit base {base.id!r}: {exc}") from None
        return model, None
    return model, LoraConfig(
        r=opts.lora.r, lora_alpha=opts.lora.alpha, lora_dropout=opts.lora.dropout,
        target_modules=list(opts.lora.target_modules), task_type=ROLE_TASK_TYPES[role],
        # The score head is new and randomly initialised, so it must be trained and saved.
        modules_to_save=["score"] if role == "rm" else None)


def learning_rate(opts: TrainOptions, role: str) -> float:
    """`--lr`, or the role's default."""
    return DEFAULT_LR[role] if opts.lr is None else opts.lr


def training_kwargs(opts: TrainOptions, role: str) -> dict[str, Any]:
    """TrainingArguments fields shared by every trainer (CPU-friendly, reproducible)."""
    import torch

    return dict(
        output_dir=str(opts.output), learning_rate=learning_rate(opts, role), lr_scheduler_type=opts.lr_scheduler,
        warmup_steps=opts.warmup, num_train_epochs=opts.epochs,
        max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
        seed=opts.seed, data_seed=opts.seed, bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=opts.logging_steps, logging_first_step=True, save_strategy="no",
        report_to="none", disable_tqdm=not opts.progress, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available())


def loss_history(log_history: list[dict[str, Any]]) -> tuple[float, ...]:
    """Training losses as logged by the Trainer, in step order."""
    return tuple(float(entry["loss"]) for entry in log_history if "loss" in entry)


def save_adapter(model: Any, opts: TrainOptions, role: str, base: BaseModel, steps: int,
                 metrics: dict[str, float], losses: tuple[float, ...],
                 num_examples: int, extra: dict[str, Any] | None = None,
                 sample: dict[str, str] | None = None) -> TrainResult:
    """Write the PEFT directory and `alignserve.json`; returns the run summary."""
    import peft
    import torch
    import transformers
    import trl

    from adapters.train.data import file_sha256

    opts.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(opts.output))
    if not (opts.output / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"PEFT did not write {opts.output / 'adapter_model.safetensors'}")
    meta = {
        "format": METADATA_FORMAT,
        "role": role,
        "base_model": base.id,
        "base_model_path": str(base.path),
        "base_fingerprint": base.fingerprint,
        "data": {"path": str(opts.data), "sha256": file_sha256(opts.data), "num_examples": num_examples},
        "eval_data": ({"path": str(opts.eval_data), "sha256": file_sha256(opts.eval_data)}
                      if opts.eval_data else None),
        "init_adapter": str(opts.init_adapter) if opts.init_adapter else None,
        "steps": steps,
        "metrics": metrics,
        "loss_history": list(losses),
        "sample": sample,
        # The learning rate as used: `--lr`, or the role's default.
        "options": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                    "lr": learning_rate(opts, role)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
        "created_unix": int(time.time()),
        **(extra or {}),
    }
    (opts.output / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return TrainResult(opts.output, steps, metrics, losses, opts.logging_steps, sample)


def read_metadata(adapter: str | Path) -> dict[str, Any]:
    """Load an adapter's `alignserve.json` (raises FileNotFoundError if absent)."""
    return json.loads((Path(adapter) / METADATA_FILE).read_text())
