# Rejection sampling (RS / RFT): https://arxiv.org/abs/2308.01825, as the baseline in DQO https://arxiv.org/abs/2410.09302
"""Rejection sampling: supervised fine-tuning on the policy's own correct samples.

Objective, over the offline dataset D of reference samples with reward r in {0, 1}:
    max_θ  E_{(x, y) ~ D, r(x, y) = 1} [ Σ_t log π_θ(y_t | x, y_<t) ]     (token mean over the batch)

Launch:
    python rs.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml rs.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python rs.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16

Deviations from the paper:
    - The loss is a token mean over the global batch (all processes), not a per-sequence mean: longer correct
      solutions are not down-weighted, and the value does not depend on the number of processes.
    - `--data gold` trains on the dataset's reference solutions instead: the paper's SFT baseline.
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr than the
      7B run (PAPER); the README's results table gives what it reaches.
"""

import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
    build_offline_dataset,
    collate,
    encode_prompt,
    encode_response,
    evaluate_reference,
    evaluate_run,
    iterate_batches,
    load_model_and_tokenizer,
    load_task,
    log_eval,
    throughput,
    token_logprobs,
)
from runtime.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint, save_model
from runtime.cli import ArgumentError, Base, arg, one_of
from runtime.launch import fit_to_data, log_metrics, report_outputs, start


@dataclass
class Args(Base):
    output_dir: str = arg("runs/rs", "where checkpoints, the final model, metrics and results go")
    data: str = arg("samples", "samples: the correct reference samples (RS); gold: the dataset's solutions (SFT)")


TINY = dict(n_train_prompts=1000, n_test=1000, epochs=2, lr=3e-4, per_device_batch_size=32)
# PAPER: the DQO paper's RS baseline (App. A): 3 epochs, lr 1e-6, global batch 128. Micro-batch and generation batch:
# what fits an 80 GB GPU at 7B (benchmarks/memory_plan.py), not paper values.
PAPER = dict(epochs=3, lr=1e-6, global_batch_size=128, per_device_batch_size=8, gen_batch_size=60)

CHECKS = dict(data=one_of("samples", "gold"))


def check_flag_pairs(args) -> None:
    """The rules that relate two flags (each flag's own range is in CHECKS)."""
    if args.data == "gold" and args.offline_data:  # gold trains on the dataset's solutions: no samples are read
        raise ArgumentError(f"--offline_data {args.offline_data}: --data gold trains on the dataset's solutions, not on "
                            "samples; drop one of the two")


# ALGO LOGIC: loss
def rs_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the correct responses, as a token mean over the batch (a loss to minimise):

        L = -Σ_{b,t} mask[b,t] · log π_θ(y_t | x, y_<t) / Σ_{b,t} mask[b,t]

    Arguments, in the order all six losses share (per-token tensors, then `mask`, then scalars): policy_logps: (B, T)
    per-token log-probs of the policy; mask: (B, T), 1 on response tokens (EOS included).
    Returns (loss, metrics), as all six losses do: `loss` the scalar to minimise; `metrics` floats, except `losses/*`,
    the loss terms as scalar tensors (the training loop averages them over processes before logging)."""
    loss = -(policy_logps * mask).sum() / mask.sum()  # scalar
    return loss, {"losses/policy": loss, "charts/response_tokens": mask.sum().item()}


def global_token_scale(accelerator, mask: torch.Tensor) -> torch.Tensor:
    """Factor that turns a per-process token mean into this process's share of the global token mean: DDP averages
    gradients over processes, so loss_local * (n_local * world / n_global) sums to the global token mean."""
    n_local = mask.sum()
    n_global = accelerator.reduce(n_local.detach().clone(), reduction="sum")
    return n_local * accelerator.num_processes / n_global.clamp(min=1)


def main():
    # setup
    args, accelerator = start(Args, TINY, PAPER, CHECKS, check_flag_pairs)
    device = accelerator.device

    # models
    model, tokenizer = load_model_and_tokenizer(args.model, accelerator, args.lora_r, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    # data
    train_problems = load_task(args.task, "train", args.train_file, args.n_train_prompts)
    test_problems = load_task(args.task, "test", args.test_file, args.n_test)
    evaluation = dict(task=args.task, max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                      sampled_seeds=args.eval_seeds, seed=args.seed)  # every evaluation of this run
    results = {"reference": evaluate_reference(model, tokenizer, test_problems, accelerator, args.model, args.cache_dir,
                                               args.test_file, **evaluation)}
    # ALGO LOGIC: data
    if args.data == "gold":
        examples = [{"prompt_ids": encode_prompt(tokenizer, p["question"], args.task),
                     "response_ids": encode_response(tokenizer, p["solution"])} for p in train_problems]
    else:
        rows = build_offline_dataset(
            accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.n_samples,
            sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed,
            max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
            train_file=args.train_file, offline_data=args.offline_data, save_to=args.save_offline_data)
        examples = [r for r in rows if r["reward"] == 1.0 and not r["truncated"]]
    accelerator.print(f"training on {len(examples)} examples")
    token_fields, seq_fields = (), ()

    # training loop
    steps_per_epoch, total_steps = fit_to_data(len(examples), args, accelerator)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    state = load_checkpoint(accelerator, args.output_dir) if args.resume else None
    step, start_epoch, start_batch = (state["step"], state["epoch"], state["batch"]) if state else (0, 0, 0)
    results = state["results"] if state else results
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    model.train()
    for epoch in range(start_epoch, args.epochs):
        t0, tokens = time.time(), 0.0
        for b, batch_rows in iterate_batches(examples, args.per_device_batch_size, args.grad_accum, args.seed, epoch,
                                             accelerator, start=start_batch if epoch == start_epoch else 0):
            if step >= total_steps:
                break
            batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer.pad_token_id, token_fields,
                                                            seq_fields).items()}
            with accelerator.accumulate(model):
                policy_logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T)
                # ALGO LOGIC: loss
                loss, metrics = rs_loss(policy_logps, batch["mask"])
                loss = metrics["losses/policy"] = loss * global_token_scale(accelerator, batch["mask"])  # global token mean
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    metrics["charts/grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += batch["attention_mask"].sum().item()
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                bar.update(1)
                metrics.update({k: accelerator.reduce(v.detach(), "mean").item()  # each loss term, averaged over processes
                                for k, v in metrics.items() if k.startswith("losses/")})
                metrics.update({"charts/lr": scheduler.get_last_lr()[0], "charts/epoch": epoch + (b + 1) / (
                    steps_per_epoch * args.grad_accum), "charts/tokens_per_s": throughput(tokens, t0)})
                log_metrics(accelerator, metrics, step, args.output_dir)
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4f}" for k in ("losses/policy",)})
                if due := checkpoint_due(accelerator, args, step):  # --save_every(_minutes); SIGTERM: save, exit 75
                    state = dict(step=step, epoch=epoch, batch=b + 1, results=results)  # what --resume restores
                    save_checkpoint(accelerator, args.output_dir, state, due)
                if args.eval_every and step % args.eval_every == 0:
                    results[f"step{step}"] = evaluate_run(model, tokenizer, test_problems, accelerator, **evaluation)
                    log_eval(accelerator, results, step, args.output_dir)
        if epoch + 1 < args.epochs and step < total_steps:  # every epoch's model, evaluated: the DQO paper picks the best
            results[f"epoch{epoch + 1}"] = evaluate_run(model, tokenizer, test_problems, accelerator, **evaluation)
            log_eval(accelerator, results, step, args.output_dir)
            save_model(accelerator, model, tokenizer, os.path.join(args.output_dir, f"model_epoch{epoch + 1}"), final=False)
    bar.close()

    # evaluate and save
    results["final"] = evaluate_run(model, tokenizer, test_problems, accelerator, **evaluation)
    save_model(accelerator, model, tokenizer, os.path.join(args.output_dir, "model"))
    log_eval(accelerator, results, step, args.output_dir)  # results.json says "final" once the models are on disk
    accelerator.end_training()
    report_outputs(accelerator, args.output_dir)


if __name__ == "__main__":
    main()
