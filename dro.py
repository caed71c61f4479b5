# DRO: https://arxiv.org/abs/2405.19107, as the baseline in DQO https://arxiv.org/abs/2410.09302
"""Direct reward optimisation (DRO-V, Algorithm 1 of Richemond et al. 2024) on the reference policy's own samples.

Objective, over the offline dataset D of single responses with reward r in {0, 1}, with the sequence log-probs
log π(y|x) = Σ_t log π(y_t | x, y_<t) and a separate value network V_φ(x) (the 1/τ-rescaled form the paper trains):
    policy:  min_θ  E_D [ -log π_θ(y|x) · sg(r - V_φ(x)) + β/2 · (log π_θ(y|x) - log π_ref(y|x))² ]
    value:   min_φ  E_D [ 1/2 · (r - V_φ(x) - β · sg(log π_θ(y|x) - log π_ref(y|x)))² ]          (sg: stop-gradient)

Launch:
    python dro.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml dro.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python dro.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16

Deviations from the paper:
    - V_φ(x) is common.ValueModel, DQO's value network (a separate copy of the backbone, as the DRO paper found best),
      read after the prompt from a forward pass over the whole row (causal attention: the prompt alone decides it).
    - log π_ref is the per-token reference log-prob stored with the offline dataset when it was sampled, so no
      reference model is kept in memory.
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr (and β)
      than the 7B run (PAPER); the README's results table gives what it reaches.
"""

import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
    ValueModel,
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
from runtime.cli import Base, arg, positive
from runtime.launch import fit_to_data, log_metrics, report_outputs, start


@dataclass
class Args(Base):
    output_dir: str = arg("runs/dro", "where checkpoints, the final model, metrics and results go")
    beta: float | None = arg(None, "KL coefficient β")
    value_lr: float | None = arg(None, "value-network learning rate (the DQO paper's DRO baseline: 1e-6)")

    def memory_terms(self) -> dict:
        return dict(super().memory_terms(), networks=2)  # the policy and the value network


TINY = dict(n_train_prompts=1000, n_test=1000, epochs=1, lr=5e-5, per_device_batch_size=64, beta=0.3, value_lr=3e-4)
# PAPER: the DQO paper's DRO baseline (App. A): β 0.03, lr 1e-7 (Qwen: 5e-7), value lr 1e-6, batch 256, 1 epoch.
# Micro-batch and generation batch: what fits 80 GB at 7B with the value model (memory_plan), not paper values.
PAPER = dict(epochs=1, lr=1e-7, global_batch_size=256, per_device_batch_size=8, gen_batch_size=40, beta=0.03, value_lr=1e-6)

CHECKS = dict(value_lr=positive())


# ALGO LOGIC: loss
def dro_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor, rewards: torch.Tensor,
             mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DRO-V's two losses (Richemond et al. 2024, Algorithm 1, 1/τ-rescaled), each a row mean to minimise. With π[b],
    ref[b] the sequence log-probs (sums over response tokens) under π_θ and π_ref:
        policy_loss = mean_b [ -π[b] · sg(r[b] - V[b]) + β/2 · (π[b] - ref[b])² ]
        value_loss  = mean_b [ 1/2 · (r[b] - V[b] - β · sg(π[b] - ref[b]))² ]
    Arguments, in the order all six losses share (tensors, then `mask`, then scalars): policy_logps, ref_logps: (B, T)
    per-token log-probs under π_θ and π_ref; values (V): (B,) V_φ(x), one per row, of its prompt (`prompt_values`
    reads it); rewards (r): (B,) the outcome of each row; mask: (B, T), 1 on response tokens. DRO is sequence-level by
    nature: the loss sums each row over its response tokens first. sg is stop-gradient: the policy loss sends no
    gradient into `values`, the value loss none into `policy_logps`.
    Returns (loss, metrics), as all six losses do: `loss` = policy_loss + value_loss, the scalar to minimise (each term
    reaches only its own network); `metrics` floats, except `losses/policy` and `losses/value`, the two terms as scalar
    tensors (the training loop averages them over processes before logging)."""
    policy_seq_logps, ref_seq_logps = (policy_logps * mask).sum(-1), (ref_logps * mask).sum(-1)  # (B,) π, (B,) ref
    logratios = policy_seq_logps - ref_seq_logps  # (B,)
    policy_loss = (-policy_seq_logps * (rewards - values).detach() + beta / 2 * logratios**2).mean()  # scalar
    value_loss = (0.5 * (rewards - values - beta * logratios.detach()) ** 2).mean()  # scalar
    return policy_loss + value_loss, {
        "losses/policy": policy_loss, "losses/value": value_loss, "rewards/mean": rewards.mean().item(),
        "rewards/value": values.mean().item(), "rewards/advantage_abs": (rewards - values).abs().mean().item(),
        "rewards/logratio": logratios.mean().item()}


def prompt_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DRO's V(x) from the value model's (B, T) output (position t: V(s_t), the state before token t), read at each row's
    first response position: the state after the prompt. mask: (B, T), 1 on response tokens. Returns (B,)."""
    return values.gather(1, mask.argmax(1, keepdim=True)).squeeze(1)  # (B,)


def main():
    # setup
    args, accelerator = start(Args, TINY, PAPER, CHECKS)
    device = accelerator.device

    # models
    model, tokenizer = load_model_and_tokenizer(args.model, accelerator, args.lora_r, args.gradient_checkpointing)
    # V_φ: a copy of the reference with a scalar head (with --lora_r: the frozen base with adapters of its own)
    value_model = ValueModel(model, args.lora_r)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=args.value_lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    value_model, value_optimizer = accelerator.prepare(value_model, value_optimizer)  # FSDP2: one model per call

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
    accelerator.print(f"training on {len(examples)} examples")
    token_fields, seq_fields = ("ref_logps",), ("reward",)

    # training loop
    steps_per_epoch, total_steps = fit_to_data(len(examples), args, accelerator)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    value_scheduler = get_scheduler("constant_with_warmup", value_optimizer, num_warmup_steps=args.warmup_steps)
    accelerator.register_for_checkpointing(value_scheduler)
    state = load_checkpoint(accelerator, args.output_dir) if args.resume else None
    step, start_epoch, start_batch = (state["step"], state["epoch"], state["batch"]) if state else (0, 0, 0)
    results = state["results"] if state else results
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    model.train()
    value_model.train()
    for epoch in range(start_epoch, args.epochs):
        t0, tokens = time.time(), 0.0
        for b, batch_rows in iterate_batches(examples, args.per_device_batch_size, args.grad_accum, args.seed, epoch,
                                             accelerator, start=start_batch if epoch == start_epoch else 0):
            if step >= total_steps:
                break
            batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer.pad_token_id, token_fields,
                                                            seq_fields).items()}
            with accelerator.accumulate(model, value_model):
                policy_logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T)
                # ALGO LOGIC: loss
                values = value_model(batch["input_ids"], batch["attention_mask"])  # (B, T) V(s_t), aligned with policy_logps
                values = prompt_values(values, batch["mask"])  # (B,) V(x): the state before the response
                loss, metrics = dro_loss(policy_logps, batch["ref_logps"], values, batch["reward"], batch["mask"],
                                         args.beta)  # row means: DDP's gradient mean is exact
                accelerator.backward(loss)  # policy_loss + value_loss: each reaches only its own network
                if accelerator.sync_gradients:
                    metrics["charts/grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                    metrics["charts/value_grad_norm"] = accelerator.clip_grad_norm_(value_model.parameters(),
                                                                                    args.max_grad_norm).item()
                optimizer.step()
                value_optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
            tokens += batch["attention_mask"].sum().item()
            if accelerator.sync_gradients:
                scheduler.step()
                value_scheduler.step()
                step += 1
                bar.update(1)
                metrics.update({k: accelerator.reduce(v.detach(), "mean").item()  # each loss term, averaged over processes
                                for k, v in metrics.items() if k.startswith("losses/")})
                metrics.update({"charts/lr": scheduler.get_last_lr()[0], "charts/epoch": epoch + (b + 1) / (
                    steps_per_epoch * args.grad_accum), "charts/tokens_per_s": throughput(tokens, t0)})
                log_metrics(accelerator, metrics, step, args.output_dir)
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4f}" for k in ("losses/policy", "losses/value",
                                                                                 "rewards/logratio")})
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
    save_model(accelerator, value_model, None, os.path.join(args.output_dir, "value_model"))
    log_eval(accelerator, results, step, args.output_dir)  # results.json says "final" once the models are on disk
    accelerator.end_training()
    report_outputs(accelerator, args.output_dir)


if __name__ == "__main__":
    main()
