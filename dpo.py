# DPO: https://arxiv.org/abs/2305.18290, as the baseline in DQO https://arxiv.org/abs/2410.09302
"""Direct preference optimisation on (correct, incorrect) pairs of the reference policy's own samples.

Objective, over pairs (x, y_w, y_l) built from the offline dataset D (y_w correct, y_l incorrect, same prompt x):
    min_θ  E [ -log σ( β (log π_θ(y_w|x) - log π_ref(y_w|x)) - β (log π_θ(y_l|x) - log π_ref(y_l|x)) ) ]  (pair mean)
with log π(y|x) = Σ_t log π(y_t | x, y_<t), a sequence log-prob.

Launch:
    python dpo.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml dpo.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python dpo.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16

Deviations from the paper:
    - Pairs follow the DQO paper (Appendix A), not human preferences: for each prompt every correct response is paired
      with every incorrect one and at most --max_pairs_per_prompt pairs are sampled (seeded); prompts whose responses
      are all correct or all incorrect give no pairs and are dropped (their number is printed).
    - log π_ref is the per-token reference log-prob stored with the offline dataset when it was sampled, so no
      reference model is kept in memory.
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr (and β)
      than the 7B run (PAPER); the README's results table gives what it reaches.
"""

import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
    DataError,
    build_offline_dataset,
    collate,
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
from runtime.cli import ArgumentError, Base, arg, at_least
from runtime.launch import fit_to_data, log_metrics, report_outputs, start


@dataclass
class Args(Base):
    output_dir: str = arg("runs/dpo", "where checkpoints, the final model, metrics and results go")
    beta: float | None = arg(None, "KL coefficient β")
    max_pairs_per_prompt: int = arg(12, "at most this many (correct, incorrect) pairs per prompt, sampled (DQO paper: 12)")

    def memory_terms(self) -> dict:
        return dict(super().memory_terms(), rows_per_example=2)  # a micro-batch of pairs: chosen and rejected


TINY = dict(n_train_prompts=1000, n_test=1000, epochs=1, lr=5e-6, per_device_batch_size=32, beta=0.1)
# PAPER: the DQO paper's DPO baseline (App. A, Gemma): 1 epoch, lr 5e-8, β 0.1, 64 pairs a step. Micro-batch and
# generation batch: what fits an 80 GB GPU at 7B (benchmarks/memory_plan.py), not paper values.
PAPER = dict(epochs=1, lr=5e-8, global_batch_size=64, per_device_batch_size=4, gen_batch_size=60, beta=0.1)

CHECKS = dict(max_pairs_per_prompt=at_least(1))


def check_flag_pairs(args) -> None:
    """The rules that relate two flags (each flag's own range is in CHECKS)."""
    if args.n_samples < 2 and not args.offline_data:  # one sample per prompt never makes a pair (imported rows may)
        raise ArgumentError(f"--n_samples {args.n_samples}: must be ≥ 2: a pair is a correct and an incorrect response")


# ALGO LOGIC: loss
def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict]:
    """The DPO loss, a pair mean (a loss to minimise). With π_c[b], π_r[b] (ref_c[b], ref_r[b]) the sequence log-probs
    (sums over response tokens) of pair b's chosen (correct) and rejected (incorrect) response under π_θ (π_ref):

        L = mean_b [ -log σ( β · ((π_c[b] - ref_c[b]) - (π_r[b] - ref_r[b])) ) ]

    Arguments, in the order all six losses share (per-token tensors, then `mask`, then scalars): policy_logps,
    ref_logps: (2B, T) per-token log-probs under π_θ and π_ref of the B pairs' rows, interleaved: row 2b is pair b's
    chosen response, row 2b + 1 its rejected one; mask: (2B, T), 1 on response tokens. DPO is sequence-level by
    nature: the loss sums each row over its response tokens first. At π_θ = π_ref the loss is log 2.
    Metrics (TRL's names): the implicit rewards β(π - ref) of chosen and rejected, the fraction of pairs whose chosen
    reward is higher (rewards/accuracies) and the mean reward margin (rewards/margins).
    Returns (loss, metrics), as all six losses do: `loss` the scalar to minimise; `metrics` floats, except `losses/*`,
    the loss terms as scalar tensors (the training loop averages them over processes before logging)."""
    policy_seq_logps, ref_seq_logps = (policy_logps * mask).sum(-1), (ref_logps * mask).sum(-1)  # (2B,), (2B,)
    policy_chosen_logps, policy_rejected_logps = policy_seq_logps[0::2], policy_seq_logps[1::2]  # (B,), (B,)
    ref_chosen_logps, ref_rejected_logps = ref_seq_logps[0::2], ref_seq_logps[1::2]  # (B,), (B,)
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    loss = -torch.nn.functional.logsigmoid(beta * logits).mean()  # scalar
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return loss, {"losses/policy": loss, "rewards/chosen": chosen_rewards.mean().item(),
                  "rewards/rejected": rejected_rewards.mean().item(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}


def build_pairs(rows: list[dict], max_pairs_per_prompt: int, seed: int) -> tuple[list[list[dict]], int]:
    """DQO paper, Appendix A: per prompt, every correct response paired with every incorrect one, then at most
    `max_pairs_per_prompt` of those pairs sampled with a seeded RNG (the same on every process). A row is correct iff
    its reward is 1. Returns ([chosen, rejected] pairs, number of prompts dropped for having no pair)."""
    by_prompt = defaultdict(lambda: ([], []))  # prompt_idx -> (correct rows, incorrect rows)
    for r in rows:
        by_prompt[r["prompt_idx"]][0 if r["reward"] == 1.0 else 1].append(r)
    rng, pairs, dropped = random.Random(seed), [], 0
    for idx in sorted(by_prompt):
        correct, incorrect = by_prompt[idx]
        candidates = [[c, w] for c in correct for w in incorrect]
        dropped += not candidates
        pairs += rng.sample(candidates, max_pairs_per_prompt) if len(candidates) > max_pairs_per_prompt else candidates
    if not pairs:
        n_correct = sum(bool(c) and not w for c, w in by_prompt.values())
        raise DataError(f"DPO has no training pairs: none of the {len(by_prompt)} prompts has both a correct and an "
                         f"incorrect response ({n_correct} all correct, {len(by_prompt) - n_correct} all incorrect); "
                         "sample more responses per prompt (--n_samples) or use a task the reference partly solves")
    return pairs, dropped


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
    rows = build_offline_dataset(
        accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.n_samples,
        sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
        train_file=args.train_file, offline_data=args.offline_data, save_to=args.save_offline_data)
    examples, n_dropped = build_pairs(rows, args.max_pairs_per_prompt, args.seed)  # [chosen, rejected] pairs
    n_prompts = len({r["prompt_idx"] for r in rows})  # the imported file's, which need not be the train split's
    accelerator.print(f"DPO pairs: {len(examples)} from {n_prompts - n_dropped} prompts; {n_dropped} prompts "
                      "dropped (all responses correct or all incorrect)")
    accelerator.print(f"training on {len(examples)} examples")
    token_fields, seq_fields = ("ref_logps",), ()

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
            batch_rows = [r for pair in batch_rows for r in pair]  # ALGO LOGIC: pairs -> rows (chosen, rejected, ...)
            batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer.pad_token_id, token_fields,
                                                            seq_fields).items()}
            with accelerator.accumulate(model):
                policy_logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T)
                # ALGO LOGIC: loss
                loss, metrics = dpo_loss(policy_logps, batch["ref_logps"], batch["mask"],  # rows: chosen, rejected, ...
                                         args.beta)  # a pair mean: DDP's gradient mean is exact
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
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4f}" for k in ("losses/policy", "rewards/margins",
                                                                                 "rewards/accuracies")})
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
