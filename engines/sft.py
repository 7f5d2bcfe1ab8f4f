"""The `trl` training engine: full fine-tuning on the exact tokens, micro-batches and loss the
harness hands over, through accelerate (one CPU process, DDP, DeepSpeed ZeRO-3 or FSDP, as
the accelerate config says).

    accelerate launch --config_file engines/accelerate/cpu.yaml engines/sft.py STAGE/engine

Reads (written by the harness, contract version 1):
  train.parquet      one row per example: input_ids (list of int), loss_mask (list of bool:
                     the tokens that are response tokens; position t-1 predicts token t)
  batches.json       {"steps": [{"epoch": e, "micro_batches": [[row, ...], ...]}, ...]}: every
                     optimiser step's micro-batches, in the harness trainer's order
  train_config.json  lr, schedule, warm-up, AdamW, clipping, precision, save_every, base model
Writes, beside the engine folder (the train stage's folder):
  model/             the fine-tuned model's config and weights, a Hugging Face folder
  train_log.jsonl    one line per step, in the harness trainer's format
and its checkpoints under engine/checkpoints/step-N (a cut-off run resumes from the newest).

Why not transformers' Trainer or TRL's SFTTrainer: both choose the batches (sampler, packing,
per-device sharding) and normalise the loss their own way; the contract is that this engine
trains on the harness's batches with the harness's loss, so the loop below is the whole
difference, and accelerate still drives DeepSpeed and FSDP exactly as Trainer would.

The loss of a step is the sum of every response token's negative log-likelihood over all of
its micro-batches on all processes, divided by the step's response-token count (known in
advance from batches.json), as the harness trainer defines it.
"""
import json
import math
import os
import shutil
import sys
import time

import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

CONTRACT = 1


def schedule_factor(kind, step, total, warmup):
    """transformers' get_*_schedule_with_warmup, as the harness computes it (0-based step)."""
    if step < warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"schedule {kind!r}")


def main(engine_dir):
    with open(os.path.join(engine_dir, "train_config.json")) as f:
        config = json.load(f)
    if config.get("contract") != CONTRACT:
        sys.exit(f"train_config.json: contract {config.get('contract')!r}, this engine speaks {CONTRACT}")
    stage_dir = os.path.dirname(os.path.abspath(engine_dir))
    table = pq.read_table(os.path.join(engine_dir, "train.parquet")).to_pydict()
    ids, masks = table["input_ids"], table["loss_mask"]
    with open(os.path.join(engine_dir, "batches.json")) as f:
        steps = json.load(f)["steps"]

    precision = config["precision"]
    # Every step runs the same number of micro-batch rounds on every process (a process with no
    # micro-batch left runs a zero-weighted one), so accelerate's accumulation stays aligned
    # and DDP, DeepSpeed and FSDP exchange gradients once per step.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rounds = math.ceil(config["grad_accum"] / world)
    accelerator = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        cpu=config["device"] == "cpu",
        gradient_accumulation_steps=rounds,
    )
    set_seed(config["seed"])
    world, rank = accelerator.num_processes, accelerator.process_index
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32, attn_implementation="sdpa")
    if config.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    adamw = config["adamw"]
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config["lr"],
        betas=(adamw["beta1"], adamw["beta2"]),
        eps=adamw["eps"],
        weight_decay=adamw["weight_decay"],
    )
    clip = config.get("clip_grad_norm")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # No dataloader is prepared, so DeepSpeed cannot infer its micro-batch ("auto"); it
        # clips inside its own step, so it takes the run's clipping, not the yaml's.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        plugin.deepspeed_config["gradient_clipping"] = clip or 0.0
    # The rate is set by hand each step: accelerate's scheduler wrapper steps once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    total, warmup = len(steps), config["warmup_steps"]

    checkpoints = os.path.join(engine_dir, "checkpoints")
    start = latest_checkpoint(checkpoints)
    if start:
        accelerator.load_state(os.path.join(checkpoints, f"step-{start:08d}"))
        accelerator.print(f"resuming at step {start} of {total}")
    log_path = os.path.join(stage_dir, "train_log.jsonl")
    if accelerator.is_main_process:
        keep_log(log_path, start)

    device = accelerator.device
    model.train()
    for step in range(start, total):
        began = time.time()
        micro = steps[step]["micro_batches"]
        response_tokens = sum(sum(masks[i][1:]) for b in micro for i in b)
        tokens = sum(len(ids[i]) for b in micro for i in b)
        lr = config["lr"] * schedule_factor(config["schedule"], step, total, warmup)
        mine = micro[rank::world]
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        grad_norm = None
        # Before the rounds: DeepSpeed steps inside the last backward.
        for group in optimizer.param_groups:
            group["lr"] = lr
        for r in range(rounds):
            batch, weight = (mine[r], 1.0) if r < len(mine) else (micro[0], 0.0)
            with accelerator.accumulate(model):
                input_ids, attention, targets, target_mask = collate(batch, ids, masks, device)
                logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                summed = -(logp * target_mask).sum()
                # accelerate divides by the rounds and the gradient exchange averages over
                # processes: scaled back, the step's gradient is the sum over its tokens / count.
                loss = summed * (weight * world * rounds / max(response_tokens, 1))
                accelerator.backward(loss)
                step_loss += (summed * weight).detach().double()
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
                    if norm is None and hasattr(model, "get_global_grad_norm"):
                        norm = model.get_global_grad_norm()
                    grad_norm = None if norm is None else float(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        total_loss = accelerator.reduce(step_loss, reduction="sum").item() / max(response_tokens, 1)
        done = step + 1
        if not math.isfinite(total_loss):
            sys.exit(f"the loss became {total_loss} at step {done}: lower training.lr or check the data")
        if accelerator.is_main_process:
            seconds = time.time() - began
            line = {
                "step": done,
                "epoch": steps[step]["epoch"],
                "loss": total_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "response_tokens": response_tokens,
                "tokens": tokens,
                "tokens_per_second": tokens / max(seconds, 1e-9),
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        save_every = config.get("save_every")
        if done < total and save_every and done % save_every == 0:
            # Written aside and renamed: a run killed while saving leaves the previous one.
            final = os.path.join(checkpoints, f"step-{done:08d}")
            accelerator.save_state(final + ".tmp")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(final + ".tmp", final)
                prune(checkpoints, config.get("keep_checkpoints", 2))
            accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    # Written aside and renamed: a model/ folder is always a whole one. (The harness then
    # writes the tokenizer and chat template the run trained under.)
    out = os.path.join(stage_dir, "model")
    partial = out + ".partial"
    state = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        partial, state_dict=state, safe_serialization=True, is_main_process=accelerator.is_main_process
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    accelerator.wait_for_everyone()


def collate(batch, ids, masks, device):
    """Right-padded ids, attention, next-token targets and which of them are response tokens."""
    width = max(len(ids[i]) for i in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    response = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, i in enumerate(batch):
        n = len(ids[i])
        input_ids[row, :n] = torch.tensor(ids[i])
        attention[row, :n] = 1
        response[row, :n] = torch.tensor(masks[i], dtype=torch.float32)
    return input_ids.to(device), attention.to(device), input_ids[:, 1:].to(device), response[:, 1:].to(device)


def latest_checkpoint(folder):
    if not os.path.isdir(folder):
        return 0
    found = [int(n[5:]) for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit()]
    return max(found, default=0)


def prune(folder, keep):
    names = sorted(n for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit())
    for name in names[: max(len(names) - keep, 0)]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def keep_log(path, steps):
    """Keeps the log lines of the steps a checkpoint holds (all of them when starting afresh: none)."""
    lines = []
    if steps and os.path.exists(path):
        with open(path) as f:
            for text in f:
                try:
                    if json.loads(text)["step"] <= steps:
                        lines.append(text)
                except (ValueError, KeyError):
                    break
    with open(path, "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: sft.py ENGINE_DIR")
    main(sys.argv[1])
