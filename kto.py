# KTO: https://arxiv.org/abs/2402.01306, as the baseline in DQO https://arxiv.org/abs/2410.09302
"""Kahneman-Tversky optimisation on the reference policy's own samples, labelled desirable iff correct.

Objective, over the offline dataset D, with h(x, y) = log π_θ(y|x) - log π_ref(y|x) (sequence log-probs):
    min_θ  E_D [ λ_D (1 - σ(β (h - z0)))  if y is correct,   λ_U (1 - σ(β (z0 - h)))  otherwise ]   (row mean)
    z0 = max(0, mean over the batch of h(x_i, y_{i+1})), detached: the KL reference point, from mismatched pairs.

Launch:
    python kto.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml kto.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python kto.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16

Deviations from the paper:
    - Desirable means reward 1 on the verifier; λ_D n_D / (λ_U n_U) = 1 by default (the KTO paper: [1, 4/3]).
    - z0 pairs prompt i with the completion of row i+1 (mod B) of the global micro-batch (all processes), so it does not
      depend on the process count. A frozen π_ref copy scores these pairs (none with --lora_r: adapters off).
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr (and β)
      than the 7B run (PAPER); the README's results table gives what it reaches.
"""

import os
import time
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
    DataError,
    build_offline_dataset,
    collate,
    evaluate_reference,
    evaluate_run,
    frozen_copy,
    iterate_batches,
    load_model_and_tokenizer,
    load_task,
    log_eval,
    reference_mode,
    throughput,
    token_logprobs,
)
from runtime.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint, save_model
from runtime.cli import Base, arg, positive
from runtime.launch import fit_to_data, log_metrics, report_outputs, start


@dataclass
class Args(Base):
    output_dir: str = arg("runs/kto", "where checkpoints, the final model, metrics and results go")
    beta: float | None = arg(None, "KL coefficient β")
    desirable_weight: float | None = arg(None, "λ_D (default: λ_U n_U / n_D, so that λ_D n_D / (λ_U n_U) = 1)")
    undesirable_weight: float = arg(1.0, "λ_U (KTO paper: 1)")

    def memory_terms(self) -> dict:
        return dict(super().memory_terms(), frozen_reference=True)  # for the KL estimate z0


TINY = dict(n_train_prompts=1000, n_test=1000, epochs=1, lr=1e-5, per_device_batch_size=256, beta=0.3)
# PAPER: the DQO paper's KTO baseline, run as its DPO one (App. A): 1 epoch, lr 5e-8; β 0.1 (the KTO paper); 128 rows, 64
# pairs' worth (no paper value). Micro-batch and generation batch: what fits 80 GB at 7B (memory_plan), not paper values.
PAPER = dict(epochs=1, lr=5e-8, global_batch_size=128, per_device_batch_size=8, gen_batch_size=40, beta=0.1)

CHECKS = dict(per_device_batch_size=(lambda v: v >= 2, "≥ 2: z0 pairs each row's prompt with another row's completion"),
              desirable_weight=positive(unset_ok=True), undesirable_weight=positive())


# ALGO LOGIC: loss
def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, kl_policy_seq_logps: torch.Tensor,
             kl_ref_seq_logps: torch.Tensor, desirable: torch.Tensor, mask: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, dict]:
    """The KTO loss, a row mean (a loss to minimise). With h[b] = Σ_t mask (policy_logps - ref_logps)[b, t], the
    sequence log-ratio, and the reference point z0 = max(0, mean(kl_policy_seq_logps - kl_ref_seq_logps)), detached:
        L = mean_b [ λ_D (1 - σ(β (h[b] - z0)))  if desirable[b],  λ_U (1 - σ(β (z0 - h[b])))  otherwise ]
    Arguments, in the order all six losses share (tensors, then `mask`, then scalars): policy_logps, ref_logps: (B, T)
    per-token log-probs under π_θ and π_ref; kl_policy_seq_logps, kl_ref_seq_logps: (B_kl,) sequence log-probs (sums
    over response tokens) of mismatched (prompt, completion) pairs, gathered from all processes (sequence-level: the
    processes' rows have different lengths); desirable: (B,) bool, the label (in the rewards' place); mask: (B, T), 1
    on response tokens. KTO is sequence-level by nature: the loss sums each row over its response tokens first.
    Returns (loss, metrics), as all six losses do: `loss` the scalar to minimise; `metrics` floats, except `losses/*`,
    the loss terms as scalar tensors (the training loop averages them over processes before logging)."""
    z0 = (kl_policy_seq_logps - kl_ref_seq_logps).mean().clamp(min=0).detach()  # scalar
    logratios = (policy_logps * mask).sum(-1) - (ref_logps * mask).sum(-1)  # (B,)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))  # (B,)
    loss = losses.mean()  # scalar
    rewards, share = beta * logratios.detach(), desirable.float().mean().item()  # (B,), scalar
    metrics = {"losses/policy": loss, "rewards/kl": z0.item(), "rewards/desirable_fraction": share}
    for name, rows in (("desirable", desirable), ("undesirable", ~desirable)):
        metrics.update({f"rewards/{name}": rewards[rows].mean().item()} if rows.any() else {})
    return loss, metrics


def mismatched_pairs(rows: list[dict], accelerator=None) -> list[dict]:
    """The rows of z0's estimate: prompt i with the completion of row i+1 (mod B) of the global micro-batch (row i+1
    may live on the next process), never a row with itself; this process's slice."""
    all_rows = gather_object(rows) if accelerator is not None and accelerator.num_processes > 1 else rows
    first = accelerator.process_index * len(rows) if accelerator is not None else 0
    return [{"prompt_ids": r["prompt_ids"], "response_ids": all_rows[(first + i + 1) % len(all_rows)]["response_ids"]}
            for i, r in enumerate(rows)]


def kto_weights(rows: list[dict], desirable_weight: float | None, undesirable_weight: float) -> tuple[float, float]:
    """(λ_D, λ_U), desirable iff reward 1. λ_D defaults to λ_U n_U / n_D: λ_D n_D / (λ_U n_U) = 1."""
    n_d = sum(r["reward"] == 1.0 for r in rows)
    if desirable_weight is None and n_d in (0, len(rows)):
        raise DataError(f"KTO: {n_d} of {len(rows)} responses are correct, so λ_D n_D / (λ_U n_U) cannot be balanced; "
                         "pass --desirable_weight explicitly")
    if desirable_weight is None:
        desirable_weight = undesirable_weight * (len(rows) - n_d) / n_d
    return desirable_weight, undesirable_weight


def main():
    # setup
    args, accelerator = start(Args, TINY, PAPER, CHECKS)
    device = accelerator.device

    # models
    model, tokenizer = load_model_and_tokenizer(args.model, accelerator, args.lora_r, args.gradient_checkpointing)
    ref_model = frozen_copy(model, accelerator) if not args.lora_r else None  # π_ref for z0 (LoRA: the adapters off)
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
    examples = build_offline_dataset(  # every response
        accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.n_samples,
        sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
        train_file=args.train_file, offline_data=args.offline_data, save_to=args.save_offline_data)
    desirable_weight, undesirable_weight = kto_weights(examples, args.desirable_weight, args.undesirable_weight)
    accelerator.print(f"training on {len(examples)} examples")
    token_fields, seq_fields = ("ref_logps",), ("reward",)

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
                kl = {k: v.to(device) for k, v in collate(mismatched_pairs(batch_rows, accelerator),
                                                         tokenizer.pad_token_id).items()}  # z0's pairs
                with torch.no_grad(), reference_mode(ref := ref_model or accelerator.unwrap_model(model)):  # z0: detached
                    kl_ref_seq_logps = (token_logprobs(ref, kl["input_ids"], kl["attention_mask"]) * kl["mask"]).sum(-1)
                with torch.no_grad():
                    kl_policy_seq_logps = (token_logprobs(model, kl["input_ids"], kl["attention_mask"]) * kl["mask"]).sum(-1)
                loss, metrics = kto_loss(policy_logps, batch["ref_logps"], accelerator.gather(kl_policy_seq_logps),
                                         accelerator.gather(kl_ref_seq_logps), batch["reward"] == 1.0, batch["mask"],
                                         args.beta, desirable_weight, undesirable_weight)
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
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4f}" for k in ("losses/policy", "rewards/kl")})
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
