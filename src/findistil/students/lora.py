"""LoRA fine-tuning of a causal-LM student on curated chat rows.

Where it sits: the ``customize`` stage calls ``CausalLMStudent.train``, which calls
``train_lora`` with the student's loaded base model. The result is a standard peft adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by
``PeftModel.from_pretrained`` and by vLLM) plus ``adapter_card.json``: base model, resolved
configs, the prompt-pruning rule, a hash of the training data and the metrics.

Recipe (what upstream's customizer does, made to fit a 2-core CPU):
- loss on the assistant answer only (prompt tokens are masked with -100);
- prompt pruning (``students/pruning.py``) when ``training.prompt_pruning``: the ~1k-token
  instructions shrink to the ~20-token headline, which is what makes CPU training feasible;
- length-grouped micro-batches with dynamic padding. ``lora.sequence_packing_enabled`` is
  honoured by this grouping only: real packing would need a block-diagonal attention mask
  that the CPU attention kernels do not take cheaply, and once prompts are pruned rows are
  so alike in length that grouped padding wastes few tokens;
- AdamW, linear warm-up then linear decay, gradient clipping at 1.0; the effective batch
  ``training.batch_size`` is reached by accumulating ``training.micro_batch_size`` rows;
- the loss of a step is the sum over its answer tokens divided by their count, so the
  gradient does not depend on how the step is cut into micro-batches;
- validation loss after every epoch; everything seeded by ``training.seed``.

The caller's model comes back as it was: the LoRA layers are removed after saving, so the
student can attach the saved adapter afresh (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from findistil.artifacts import staged_dir
from findistil.config import LoraConfig, TrainingConfig
from findistil.errors import Cancelled, DataError
from findistil.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from findistil.records import message_text
from findistil.students.base import MODEL_LOAD_LOCK, TrainResult
from findistil.students.pruning import PruningRule

# peft 0.21 still calls transformers' deprecated ``is_gradient_checkpointing``; the warning is
# theirs to fix and only clutters the CLI output.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

CARD_NAME = "adapter_card.json"
CARD_FORMAT = "findistil-adapter/1"
_MEGA_BATCHES = 8  # steps pooled before sorting by length: more grouping, still shuffled


@dataclass
class Example:
    """One tokenised row: prompt ids followed by answer ids; labels mask the prompt."""

    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


# ------------------------------------------------------------------------------ data


def split_row(row: dict[str, Any], index: int, name: str = "train") -> tuple[list, dict]:
    """(prompt messages, answer message) of an upstream row; DataError naming the row."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{name} row {index}: needs 'messages' with the request and the assistant "
            "answer; re-run curation to rebuild the dataset"
        )
    answer = messages[-1]
    if answer.get("role") != "assistant" or not isinstance(answer.get("content"), str):
        raise DataError(
            f"{name} row {index}: the last message must be the assistant's text answer "
            f"(got role {answer.get('role')!r}); re-run curation to rebuild the dataset"
        )
    return list(messages[:-1]), answer


def data_hash(*row_sets: Sequence[dict[str, Any]]) -> str:
    """sha256 over the rows as canonical JSON: ties an adapter to the data it saw."""
    digest = hashlib.sha256()
    for rows in row_sets:
        for row in rows:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\n")
        digest.update(b"\x00")
    return digest.hexdigest()


def encode_row(tokenizer, prompt: list[dict], answer: dict, max_len: int) -> Example:
    """Tokenise one conversation the way the engine will see it at inference time.

    The prompt is rendered with the generation prompt (what the engine feeds the model) and
    tokenised separately from the answer, so the answer tokens are exactly the ones the
    model must produce after that prompt. The answer ends at the chat template's end token.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    target = message_text(answer)  # the content, or the tool calls written out
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": target}], tokenize=False
    )
    eos = tokenizer.eos_token or ""
    if full_text.startswith(prompt_text):
        answer_text = full_text[len(prompt_text) :]
        if eos and eos in answer_text:
            answer_text = answer_text[: answer_text.index(eos) + len(eos)]
    else:  # a template that renders history differently: fall back to content + end token
        answer_text = target + eos
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[:max_len]
    keep = max_len - len(answer_ids)
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []  # cut the start, never the answer
    return Example(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)


def encode_rows(
    tokenizer, rows: Sequence[dict], rule: PruningRule | None, max_len: int, name: str
) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        prompt, answer = split_row(row, i, name)
        if rule is not None:
            prompt = rule.apply(prompt)
        examples.append(encode_row(tokenizer, prompt, answer, max_len))
    return examples


def plan_steps(
    examples: Sequence[Example], batch_size: int, micro_batch_size: int, rng: random.Random
) -> list[list[list[int]]]:
    """One epoch as optimizer steps, each a list of micro-batches (lists of row indices).

    Rows are shuffled, pooled ``_MEGA_BATCHES`` steps at a time, sorted by length inside
    the pool (so micro-batches hold rows of similar length: little padding), and the steps
    are shuffled again so long and short steps interleave.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = batch_size * _MEGA_BATCHES
    steps = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(examples[i].input_ids))
        for s in range(0, len(chunk), batch_size):
            rows = chunk[s : s + batch_size]
            steps.append(
                [rows[m : m + micro_batch_size] for m in range(0, len(rows), micro_batch_size)]
            )
    rng.shuffle(steps)
    return steps


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch (labels -100 and mask 0 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens of a micro-batch.

    The output layer runs only on the positions that predict an answer token: with pruned
    prompts that is ~7 of ~50 positions, and SmolLM2's 49k-word output layer is a fifth of
    the model's compute (plus a 176 MB logits tensor per 16-row micro-batch).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    if decoder is None or head is None or decoder is inner:  # no split: full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = logits.logits[:, :-1, :].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    keep = targets != -100
    logits = head(hidden[:, :-1][keep]).float()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-style capped logits
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ------------------------------------------------------------------------------ training


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _val_loss(model, examples, micro, pad_id, device, should_stop: StopFn) -> float | None:
    if not examples:
        return None
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), micro):
            if should_stop():
                raise Cancelled("training cancelled during validation")
            chunk = [examples[i] for i in order[start : start + micro]]
            total += float(answer_loss_sum(model, _move(collate(chunk, pad_id), device)))
            tokens += sum(e.answer_tokens for e in chunk)
    model.train()
    return total / max(1, tokens)


@contextlib.contextmanager
def attached_lora(model, config) -> Iterator[tuple[Any, str]]:
    """Attach a fresh trainable LoRA adapter for the duration of training, then remove it.

    ``model`` is either a plain transformers model (peft wraps it and ``unload`` takes the
    layers out again) or a ``PeftModel`` that already serves other adapters (the engine's
    model once an adapter was loaded): then a temporary adapter is added beside them, made
    the only trainable one, and deleted afterwards, the previously active adapter restored.
    Either way the caller gets its model back as it was, including ``requires_grad`` flags
    and train/eval mode. Yields ``(peft_model, adapter_name)``.
    """
    from peft import PeftModel, get_peft_model

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    if isinstance(model, PeftModel):
        name = f"findistil_train_{uuid.uuid4().hex[:8]}"
        previous = model.active_adapter
        with MODEL_LOAD_LOCK:
            model.add_adapter(name, config)
        model.set_adapter(name)
        for pname, param in model.named_parameters():
            param.requires_grad_(f".{name}." in pname)
        try:
            yield model, name
        finally:
            model.delete_adapter(name)
            if previous in model.peft_config:
                model.set_adapter(previous)
            _restore(model, requires_grad, was_training)
        return
    if hasattr(model, "peft_config"):
        raise TypeError("this model carries LoRA layers of a PeftModel: pass the PeftModel itself")
    with MODEL_LOAD_LOCK:
        peft_model = get_peft_model(model, config)
    try:
        yield peft_model, "default"
    finally:
        peft_model.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config  # else a later PeftModel.from_pretrained sees two adapters
        _restore(model, requires_grad, was_training)


def _restore(model, requires_grad: dict[str, bool], was_training: bool) -> None:
    for name, param in model.named_parameters():
        if name in requires_grad:
            param.requires_grad_(requires_grad[name])
    model.train(was_training)


def _save_adapter(peft_model, name: str, base_model_id: str, out: Path) -> None:
    """Write one adapter in plain peft layout (adapter_config.json at the folder's top)."""
    peft_model.peft_config[name].base_model_name_or_path = base_model_id
    staging = out / "_peft"
    # no embedding check: it would look the base id up on the hub
    peft_model.save_pretrained(staging, selected_adapters=[name], save_embedding_layers=False)
    source = staging if name == "default" else staging / name
    for item in source.iterdir():
        if item.is_file():
            item.rename(out / item.name)
    shutil.rmtree(staging)


def train_lora(
    model,
    tokenizer,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    out_dir: Path,
    *,
    training: TrainingConfig,
    lora: LoraConfig,
    base_model_id: str,
    progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
) -> TrainResult:
    """Train a LoRA adapter on ``model`` and save it to ``out_dir``.

    Args:
        model: a loaded causal LM, plain or a ``PeftModel`` serving other adapters; it is
            returned to its original state (see ``attached_lora``).
        tokenizer: its tokenizer, with a chat template.
        train_rows, val_rows: upstream rows ``{"messages": [..., {"role": "assistant", ...}]}``.
        out_dir: the adapter folder to create (written only when training finished).
        training, lora: resolved configs; base_model_id: recorded in the card.
    Returns:
        ``TrainResult(path=out_dir, epochs_completed, steps_completed, metrics)``.
    Raises:
        DataError for unusable rows; Cancelled when ``should_stop()`` turned true (nothing is
        left on disk). Example:
        ``train_lora(m, tok, rows, [], Path("adapter"), training=TrainingConfig(),
        lora=LoraConfig(), base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct")``.
    """
    from peft import LoraConfig as PeftLoraConfig

    if not train_rows:
        raise DataError("no training rows: curate a dataset with a non-empty training split")
    out_dir = Path(out_dir)
    rule = None
    if training.prompt_pruning:
        rule = PruningRule.detect([r.get("messages") or [] for r in train_rows])
        rule = None if rule.is_identity else rule
    max_len = training.max_seq_length
    train_ex = encode_rows(tokenizer, train_rows, rule, max_len, "train")
    val_ex = encode_rows(tokenizer, val_rows, rule, max_len, "validation")
    if not any(e.answer_tokens for e in train_ex):
        raise DataError("every training answer is empty: nothing to learn from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device

    batch_size = min(training.batch_size, len(train_ex))
    micro = min(training.micro_batch_size, batch_size)
    steps_per_epoch = math.ceil(len(train_ex) / batch_size)
    total_steps = steps_per_epoch * training.epochs
    warmup = min(total_steps, math.ceil(training.warmup_ratio * total_steps))

    torch.manual_seed(training.seed)  # LoRA A init and dropout masks
    rng = random.Random(training.seed)
    peft_cfg = PeftLoraConfig(
        r=lora.adapter_dim,
        lora_alpha=lora.alpha,
        lora_dropout=lora.adapter_dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with attached_lora(model, peft_cfg) as (peft_model, adapter_name):
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=training.learning_rate, weight_decay=training.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
        peft_model.train()
        step = 0
        history: list[dict[str, Any]] = []
        started = time.perf_counter()
        for epoch in range(training.epochs):
            epoch_loss, epoch_tokens = 0.0, 0
            for plan in plan_steps(train_ex, batch_size, micro, rng):
                step_tokens = sum(train_ex[i].answer_tokens for mb in plan for i in mb)
                step_loss = 0.0
                for mb in plan:
                    if should_stop():
                        raise Cancelled(f"training cancelled at step {step} of {total_steps}")
                    batch = _move(collate([train_ex[i] for i in mb], pad_id), device)
                    loss = answer_loss_sum(peft_model, batch) / max(1, step_tokens)
                    loss.backward()
                    step_loss += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_loss += step_loss * step_tokens
                epoch_tokens += step_tokens
                progress(
                    Progress(
                        "train",
                        step,
                        total_steps,
                        {
                            "epochs_completed": epoch,
                            "steps_completed": step,
                            "loss": round(step_loss, 5),
                            "lr": scheduler.get_last_lr()[0],
                        },
                    )
                )
            val = _val_loss(peft_model, val_ex, micro, pad_id, device, should_stop)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": epoch_loss / max(1, epoch_tokens),
                    "val_loss": val,
                }
            )
            progress(
                Progress(
                    "train",
                    step,
                    total_steps,
                    {
                        "epochs_completed": epoch + 1,
                        "steps_completed": step,
                        "loss": history[-1]["train_loss"],
                        "val_loss": val,
                    },
                )
            )
        seconds = time.perf_counter() - started
        if should_stop():
            raise Cancelled("training cancelled before the adapter was saved")

        metrics = {
            "train_loss": history[-1]["train_loss"],
            "val_loss": history[-1]["val_loss"],
            "epochs": history,
            "train_seconds": round(seconds, 3),
            "examples_per_s": round(len(train_ex) * training.epochs / max(seconds, 1e-9), 3),
            "train_rows": len(train_ex),
            "val_rows": len(val_ex),
            "mean_tokens_per_row": round(
                sum(len(e.input_ids) for e in train_ex) / len(train_ex), 1
            ),
            "prompt_pruning": rule is not None,
        }
        card = {
            "format": CARD_FORMAT,
            "kind": "lora",
            "base_model": base_model_id,
            "training_config": training.model_dump(mode="json"),
            "lora_config": lora.model_dump(mode="json"),
            "pruning_rule": rule.to_dict() if rule is not None else None,
            "data": {
                "train_rows": len(train_rows),
                "val_rows": len(val_rows),
                "sha256": data_hash(train_rows, val_rows),
            },
            "metrics": metrics,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        with staged_dir(out_dir) as tmp:  # never a half-written adapter at out_dir
            _save_adapter(peft_model, adapter_name, base_model_id, tmp)
            (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, ensure_ascii=False))
    return TrainResult(
        path=out_dir, epochs_completed=training.epochs, steps_completed=step, metrics=metrics
    )


def read_card(path: Path) -> dict[str, Any]:
    """The ``adapter_card.json`` of an artefact folder ({} when there is none)."""
    card = Path(path) / CARD_NAME
    return json.loads(card.read_text()) if card.is_file() else {}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
