"""Distil a harvest into a small student on CPU: top-K KL (with the tail bucket) + sampled CE.

    python examples/train_student.py OUT --steps 200 --batch-size 8 --max-len 128

The student is a randomly initialised tiny Llama using the teacher's tokenizer (found through the
``model_root`` the harvest's provenance recorded, or ``--tokenizer``). Per trained position the
loss compares the teacher's top K plus its tail bucket (the mass outside the top K) with the
student's log-probs at the same K ids plus the student's own remaining mass, so both sides are
full distributions over K + 1 outcomes. Cross-entropy on the sampled tokens is added with a small
weight (``--ce-weight``, 0.001): it is an unbiased but noisy estimate of the same target, mostly
noise for a high-entropy teacher such as the tests' random one; raise it for a peaked teacher.
The student has one layer (the tests' teacher has two and was built with seed 0, so a same-shape
student with that seed would start out as the teacher). One prompt in ``heldout_every`` (all its
samples) is held out to measure the KL. On a tiny input (fewer than ``FEW_PROMPTS`` training
prompts) the student memorises the few prompts it sees and the held-out KL can end higher than
it started: the script says so at the start, and again if it happens. ``--save`` writes the
student with the teacher's tokenizer files, so the folder loads with ``from_pretrained`` alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import harvest
from schemas.records import METADATA_KEY

LN2 = math.log(2.0)
FEW_PROMPTS = 200  # below this many training prompts, expect the student to memorise them
TINY_INPUT_HINT = (
    "the held-out KL measures generalisation to prompts the student never saw; with only {n} "
    "training prompts it memorises them and the held-out KL can get worse (harvest more "
    "prompts, or train fewer steps)"
)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # kd + ce_weight * ce, per step
    kd_losses: list[float] = field(default_factory=list)
    ce_losses: list[float] = field(default_factory=list)
    heldout_kl_before: float = math.nan
    heldout_kl_after: float = math.nan


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def topk_kl(student_logprobs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top K + one tail bucket, per position [B, L]."""
    q_top = student_logprobs.gather(-1, batch["top_ids"].long())
    # The student's mass outside those K ids; clamped so a saturated student keeps a gradient.
    q_tail = log1mexp(torch.logsumexp(q_top, dim=-1).clamp(max=-1e-6))
    p_top, p_tail = batch["top_logprobs"], batch["tail_logprob"]
    top = torch.where(torch.isfinite(p_top), p_top.exp() * (p_top - q_top), 0.0).sum(-1)
    tail = torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), 0.0)
    return top + tail


def losses(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Mean top-K KL and mean sampled-token CE over the batch's trained positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logq = torch.log_softmax(logits.float(), dim=-1)
    mask = batch["loss_mask"].float()
    count = mask.sum().clamp(min=1.0)
    kd = (topk_kl(logq, batch) * mask).sum() / count
    # Logits at t predict input_ids[t + 1] (the harvest's alignment), so shift by one.
    nxt = logq[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ce = -(nxt * mask[:, :-1]).sum() / count
    return kd, ce


def split_prompts(out: str | Path, heldout_every: int) -> tuple[list[str], list[str]]:
    """Training and held-out prompt ids: whole prompts, chosen by a stable hash."""
    prompt_ids = harvest.open_dataset(out).to_table(columns=["prompt_id"])["prompt_id"]
    train, held = [], []
    for p in sorted(set(prompt_ids.to_pylist())):
        is_held = int(hashlib.sha256(p.encode()).hexdigest(), 16) % heldout_every == 0
        (held if is_held else train).append(p)
    return train, held


def heldout_filter(out: str | Path, heldout_every: int) -> tuple[ds.Expression, ds.Expression]:
    """Filters for the training and held-out rows."""
    held = pa.array(split_prompts(out, heldout_every)[1], pa.string())  # typed even if empty
    is_held = ds.field("prompt_id").isin(held)
    return ~is_held, is_held


def teacher_tokenizer(out: str | Path, tokenizer: str | None) -> str:
    """The teacher's tokenizer folder: ``--tokenizer``, or the provenance's ``model_root``."""
    if tokenizer is None:
        meta = json.loads(harvest.open_dataset(out).schema.metadata[METADATA_KEY])
        tokenizer = (meta.get("teacher") or {}).get("model_root")
    if not tokenizer or not Path(tokenizer).is_dir():
        raise SystemExit(f"cannot find the teacher's tokenizer ({tokenizer}); pass --tokenizer")
    return tokenizer


def student_for(out: str | Path, tokenizer: str | None, max_len: int) -> LlamaForCausalLM:
    """A random tiny Llama over the teacher's vocabulary."""
    tok = AutoTokenizer.from_pretrained(teacher_tokenizer(out, tokenizer))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
        max_position_embeddings=max_len, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def as_torch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items() if not isinstance(v, list)}


@torch.no_grad()
def heldout_kl(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total = count = 0.0
    for batch in batches:
        kd, _ = losses(model, batch)
        n = float(batch["loss_mask"].sum())
        total, count = total + float(kd) * n, count + n
    model.train()
    return total / count if count else math.nan


def train(
    out: str | Path,
    steps: int = 30,
    *,
    batch_size: int = 8,
    max_len: int = 64,
    lr: float = 3e-3,
    ce_weight: float = 0.001,
    heldout_every: int = 5,
    heldout_batches: int = 50,
    seed: int = 1,
    tokenizer: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[LlamaForCausalLM, TrainResult]:
    """Train a fresh student for ``steps`` steps; return it and its per-step losses."""
    torch.manual_seed(seed)
    model = student_for(out, tokenizer, max_len)
    train_rows, held_rows = heldout_filter(out, heldout_every)
    trained_prompts = len(split_prompts(out, heldout_every)[0])
    if trained_prompts < FEW_PROMPTS:
        log("note: " + TINY_INPUT_HINT.format(n=trained_prompts))
    held_stream = harvest.iter_batches(out, batch_size, max_len, filter=held_rows)
    held = [as_torch(b) for _, b in zip(range(heldout_batches), held_stream, strict=False)]
    result = TrainResult(heldout_kl_before=heldout_kl(model, held))
    log(f"held-out top-K KL before training: {result.heldout_kl_before:.4f}")

    def epochs() -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:  # a new shuffle seed per epoch
            seen = 0
            for batch in harvest.iter_batches(
                out, batch_size, max_len, shuffle=True, seed=seed + epoch, filter=train_rows
            ):
                seen += 1
                yield batch
            if not seen:
                raise SystemExit(f"{out}: no training rows")
            epoch += 1

    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step, batch in zip(range(steps), epochs(), strict=False):
        kd, ce = losses(model, as_torch(batch))
        loss = kd + ce_weight * ce
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        result.losses.append(loss.item())
        result.kd_losses.append(kd.item())
        result.ce_losses.append(ce.item())
        log(f"step {step + 1:4d}  loss {loss.item():.5f}  kd {kd.item():.5f}  ce {ce.item():.4f}")
    result.heldout_kl_after = heldout_kl(model, held)
    log(f"held-out top-K KL after training:  {result.heldout_kl_after:.4f}")
    if result.heldout_kl_after > result.heldout_kl_before:
        log("held-out KL got worse: " + TINY_INPUT_HINT.format(n=trained_prompts))
    return model, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a harvest output folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tokenizer", help="teacher tokenizer folder (default: from provenance)")
    parser.add_argument("--save", help="folder to save the trained student in")
    args = parser.parse_args(argv)
    model, _ = train(
        args.output,
        args.steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        ce_weight=args.ce_weight,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    if args.save:  # the student and the tokenizer it was trained with, in one folder
        model.save_pretrained(args.save)
        AutoTokenizer.from_pretrained(
            teacher_tokenizer(args.output, args.tokenizer)
        ).save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
