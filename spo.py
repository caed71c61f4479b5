# Soft Policy Optimization (SPO): https://arxiv.org/abs/2503.05453
"""SPO: soft RL with the cumulative Q-parameterisation (no value network), on offline data and fresh rollouts.

Objective. The policy is read as a soft Q-function relative to the reference π_0 (paper §2):
    A_t = β (log π_θ(y_t | s_t) − log π_0(y_t | s_t)),      Q_t = Q̂_0 + Σ_{t' ≤ t} A_t'
For any θ this Q satisfies the soft Bellman equation β log Σ_a π_0(a | s_t) exp(Q_{t+1}(a) / β) = Q_t (Theorem 2.2),
so only the terminal condition Q_T = r is learned:
    min_θ  E_{(x, y) ~ offline data ∪ rollouts} [ (Q_T − r)² ]      (--loss_type squared; bce, advantage_bce, reverse_q)
with r = reward − 1 ∈ {0, −1} and Q̂_0 = β log E_{π_0}[exp(r / β)] = β log(Ŝ_0 + (1 − Ŝ_0) e^{−1/β}), where Ŝ_0 is the
prompt's success rate under the reference. The optimum is π_θ ∝ π_0 exp(Q / β): the reference, tilted towards success.

Launch:
    python spo.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml spo.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python spo.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16
    python spo.py --online_fraction 0                                # purely offline (1: purely online)

Deviations from the paper:
    - Ŝ_0 comes from the offline dataset's samples (the paper uses 800 per prompt; --q0_samples adds more), drawn with
      the offline sampler rather than π_0 at temperature 1, so Q̂_0 is that of the sampler.
    - An online rollout takes the prompt of the offline row it replaces, in fixed slots of each micro-batch
      (`online_slots`): the mix is exact at every step and the same for any number of processes.
    - Rollouts run synchronously on the training processes, not on asynchronous rollout workers (the paper's setup).
      At each refresh of the rollout policy (every --model_update_interval steps) every process generates the
      rollouts of all online slots of the next interval's micro-batches at once, in generate calls of --gen_batch_size
      sequences, and the steps consume them slot by slot (`pending_rollouts`). Per slot the prompt, the policy version
      and the temperature draw are those of a generate call per micro-batch; what changes is the random stream: a call
      holds several micro-batches' sequences and is seeded by (seed, policy version, call, process), so the sampled
      tokens differ. A window is always a whole interval: up to interval − 1 steps of rollouts past --max_steps go unused.
    - The rollout temperature ~ U(0.1, 0.8) is drawn per process and micro-batch, not per sequence.
      The frozen reference and rollout policy are bf16 copies beside the policy (none with --online_fraction 0).
    - The loss is a mean over sequences; the paper does not say how it reduces the batch.
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr (and β)
      than the 7B run (PAPER); the README's results table gives what it reaches.
"""

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
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
    rollout_chunk,
    score_rows,
    throughput,
    token_logprobs,
)
from runtime.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint, save_model
from runtime.cli import ArgumentError, Base, arg, at_least, between, one_of, positive
from runtime.launch import fit_to_data, log_metrics, report_outputs, start
from runtime.sharding import plain_name, unsharded


@dataclass
class Args(Base):
    output_dir: str = arg("runs/spo", "where checkpoints, the final model, metrics and results go")
    beta: float | None = arg(None, "KL coefficient β: the soft-RL temperature (paper's 1/ln(100000) ≈ 0.087)")
    loss_type: str | None = arg(None, "squared, bce (the paper's headline SPO), advantage_bce or reverse_q")
    online_fraction: float = arg(0.5, "share of each batch that is fresh rollouts (0: purely offline, 1: purely online)")
    model_update_interval: int = arg(10, "refresh the rollout policy from the trained one every N optimizer steps")
    rollout_min_temperature: float = arg(0.1, "rollout temperature ~ U(min, max), drawn per generate call (paper: 0.1)")
    rollout_max_temperature: float = arg(0.8, "rollout temperature ~ U(min, max) (paper: 0.8)")
    rollout_top_p: float = arg(0.95, "rollout top_p")
    pass_eval_problems: int | None = arg(None, "pass@1/pass@10 on the first N test problems (default: all; tiny: 200)")
    q0_samples: int = arg(0, "extra reference samples per prompt for Ŝ_0, pooled with the offline ones (the paper's Ŝ_0 "
                             "pools 800 in all; the docstring says why the default is 0)")

    def memory_terms(self) -> dict:  # a frozen copy of the policy makes the online rows, the reference scores them
        online = len(online_slots(self.per_device_batch_size, self.online_fraction))
        return dict(super().memory_terms(), frozen_reference=online > 0, rollout_policy=online > 0, online_rows=online)


# Tiny: pass@k on the first 200 test problems (20 samples each on all 1000: ~9 minutes per evaluation on 2 cores)
TINY = dict(n_train_prompts=1000, n_test=1000, epochs=1, lr=1e-4, per_device_batch_size=32, beta=0.5,
            pass_eval_problems=200, loss_type="squared")
# PAPER: 100k steps at batch 128, lr 6e-8 with 200 warmup steps, β = 1/ln(100000), the headline "SPO" loss (the
# cross-entropy Q-regression, bce). Micro-batch and generation batch: what fits 80 GB at 7B (memory_plan), not paper.
PAPER = dict(max_steps=100_000, lr=6e-8, warmup_steps=200, global_batch_size=128, per_device_batch_size=8,
             gen_batch_size=20, beta=1 / math.log(100_000), loss_type="bce")
PASS_EVAL = {"pass_n": 20, "pass_k": (1, 10), "pass_sampling": {"temperature": 0.4, "top_p": 0.95, "top_k": 0}}  # paper

CHECKS = dict(loss_type=one_of("squared", "bce", "advantage_bce", "reverse_q"), model_update_interval=at_least(1),
              online_fraction=between(0, 1), rollout_min_temperature=positive(), rollout_max_temperature=positive(),
              rollout_top_p=between(0, 1, lo_open=True), pass_eval_problems=at_least(1, unset_ok=True), q0_samples=at_least(0))


def check_flag_pairs(args) -> None:
    """The rules that relate two flags (each flag's own range is in CHECKS)."""
    n_online = args.per_device_batch_size * args.online_fraction  # rollouts per micro-batch
    if round(n_online) != round(n_online, 6):
        raise ArgumentError(f"--online_fraction {args.online_fraction!r}: must be in [0, 1], a whole number of rollouts "
                            f"per micro-batch (of --per_device_batch_size {args.per_device_batch_size})")
    if args.rollout_max_temperature < args.rollout_min_temperature:
        raise ArgumentError(f"--rollout_max_temperature {args.rollout_max_temperature!r}: must be ≥ "
                            f"--rollout_min_temperature {args.rollout_min_temperature!r}")


# ALGO LOGIC: loss
def soft_q(policy_logps: torch.Tensor, ref_logps: torch.Tensor, q0: torch.Tensor, mask: torch.Tensor,
           beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative Q-parameterisation. policy_logps, ref_logps, mask: (B, T); q0: (B,). Returns (advantages, q),
    both (B, T): A_t = β mask_t (ℓ_t − ℓ_ref,t) and Q_t = Q̂_0 + Σ_{t' ≤ t} A_t' (Q̂_0 before the response)."""
    advantages = beta * (policy_logps - ref_logps) * mask  # (B, T)
    return advantages, q0[:, None] + advantages.cumsum(-1)  # (B, T), (B, T)


def spo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, q0: torch.Tensor, rewards: torch.Tensor,
             mask: torch.Tensor, beta: float, loss_type: str = "squared",
             max_logp: float = -1e-4) -> tuple[torch.Tensor, dict]:
    """SPO's terminal regression of the cumulative Q onto the reward, as a mean over the batch (a loss to minimise).
    With Q_T = q0 + β Σ_t mask (ℓ_t − ℓ_ref,t), per sequence:
        squared:        (Q_T − r)²
        bce:            −x ŷ − (1 − x) log(1 − e^ŷ),  ŷ = Q_T/β the predicted log P(success), x = e^{r/β} the target;
                        ŷ is clipped to at most `max_logp` < 0 (straight-through in the second term, a plain clip
                        in the first, so nothing pushes ŷ above 0)
        advantage_bce:  the same cross-entropy between σ(Σ_t A_t / β) and σ((r − q0) / β): both sides of
                        Σ_t A_t = r − q0 warped by a sigmoid
        reverse_q:      Σ_t mask_t (Q_t − R_t)², R_t = r − Σ_{t' > t} A_t' (detached): every Q_t regressed
    Arguments, in the order all six losses share (tensors, then `mask`, then scalars): policy_logps, ref_logps: (B, T)
    per-token log-probs of the policy and the reference; q0: (B,) Q̂_0 of each prompt, the soft value before the
    response (in the values' place); rewards: (B,) r ∈ {0, −1}, the outcome of each row; mask: (B, T), 1 on response
    tokens.
    Returns (loss, metrics), as all six losses do: `loss` the scalar to minimise; `metrics` floats, except `losses/*`,
    the loss terms as scalar tensors (the training loop averages them over processes before logging)."""
    advantages, q = soft_q(policy_logps, ref_logps, q0, mask, beta)  # (B, T), (B, T)
    q_T = q[:, -1]  # (B,) padding after the response adds nothing
    if loss_type == "squared":
        losses = (q_T - rewards) ** 2  # (B,)
    elif loss_type == "bce":
        y, x = q_T / beta, torch.exp(rewards / beta)  # (B,) predicted and target log P(success), P(success)
        y_clip = y.clamp(max=max_logp)  # (B,) no gradient above the clip: the positive term never pushes ŷ up there
        y_st = y + (y_clip - y).detach()  # (B,) clipped value, straight-through gradient
        losses = -x * y_clip - (1 - x) * torch.log(-torch.expm1(y_st))  # (B,)
    elif loss_type == "advantage_bce":
        target = torch.sigmoid((rewards - q0) / beta)  # (B,)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(advantages.sum(-1) / beta, target,
                                                                      reduction="none")  # (B,)
    elif loss_type == "reverse_q":
        targets = (rewards[:, None] - (q_T[:, None] - q)).detach()  # (B, T) R_t = r − Σ_{t' > t} A_t'
        losses = ((q - targets) ** 2 * mask).sum(-1)  # (B,)
    else:
        raise ValueError(f"--loss_type {loss_type!r}: expected squared, bce, advantage_bce or reverse_q")
    loss = losses.mean()
    metrics = {"losses/policy": loss, "rewards/q_T": q_T.mean().item(), "rewards/q0": q0.mean().item(),
               "rewards/kl": (advantages.sum(-1) / beta).mean().item()}
    return loss, metrics


def soft_value_q0(success_rate: torch.Tensor, beta: float) -> torch.Tensor:
    """Q̂_0 = β log E_{π_0}[e^{r/β}] = β log(Ŝ_0 + (1 − Ŝ_0) e^{−1/β}) for r ∈ {0, −1}, stable at Ŝ_0 ∈ {0, 1}."""
    s = success_rate.double()
    return (beta * torch.logaddexp(s.log(), torch.log1p(-s) - 1 / beta)).float()


def estimate_q0(rows: list[dict], beta: float) -> dict[int, float]:
    """Q̂_0 per prompt (keyed by `prompt_idx`) from the success rate of that prompt's reference samples."""
    rewards: dict[int, list[float]] = {}
    for r in rows:
        rewards.setdefault(r["prompt_idx"], []).append(r["reward"])
    idx = sorted(rewards)
    return dict(zip(idx, soft_value_q0(torch.tensor([sum(rewards[i]) / len(rewards[i]) for i in idx]), beta).tolist()))


def online_slots(batch_size: int, fraction: float) -> list[int]:
    """Positions j of a micro-batch whose rows become fresh rollouts: ⌊(j+1)f⌋ > ⌊jf⌋, ⌊Bf⌋ of them, spread evenly."""
    return [j for j in range(batch_size) if math.floor((j + 1) * fraction + 1e-9) > math.floor(j * fraction + 1e-9)]


class RolloutPolicy:
    """A frozen copy of the policy (`frozen_copy`: on this process, unsharded) that generates online rollouts, refreshed
    from the trained policy every `interval` optimizer steps (`version`: the step it was copied at). Has
    state_dict/load_state_dict, so checkpoints resume it exactly."""

    def __init__(self, model, interval: int, accelerator):
        self.model, self.interval, self.version = frozen_copy(model, accelerator), interval, 0

    def maybe_refresh(self, model, step: int) -> None:
        """`model`: the prepared policy. Under sharding every process refreshes at the same step (a collective)."""
        if step % self.interval == 0:
            with torch.no_grad(), unsharded(model) as policy:
                mine = dict(self.model.named_parameters())
                for name, p in policy.named_parameters():
                    mine[plain_name(name)].copy_(p)
            self.version = step

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.version = state["version"]


def online_rollouts(rollout_model, ref_model, tokenizer, rows: list[dict], task: str, sampling: dict,
                    max_new_tokens: int, seed: int) -> list[dict]:
    """One fresh rollout of `rollout_model` (full parameters on this process, e.g. a RolloutPolicy's) for each row's
    prompt (`rows`: prompt_ids, answer, prompt_idx) in one generate call, graded, with the reference's per-token
    log-probs of the response (`ref_logps`, from `ref_model`: a frozen copy, or a LoRA policy whose adapters
    reference_mode turns off) and `online` set. `sampling["temperature"]` may be a list, one per row. Seeded: the same
    seed gives the same rollouts."""
    fresh = rollout_chunk(rollout_model, tokenizer, [r["prompt_ids"] for r in rows], [r["answer"] for r in rows], task,
                          range(len(rows)), 1, sampling, max_new_tokens, seed)
    with reference_mode(ref_model):
        score_rows(ref_model, fresh, tokenizer.pad_token_id)
    return [dict(f, ref_logps=f.pop("logps"), prompt_idx=r["prompt_idx"], online=True) for f, r in zip(fresh, rows)]


def window_batches(examples: list, args, accelerator, steps_per_epoch: int, first: int, last: int) -> list[tuple]:
    """This process's micro-batches of optimizer steps [first, last), as (epoch, index, rows): exactly those that
    `iterate_batches` yields for them (the data order depends only on seed and epoch), across epoch ends."""
    per_epoch = steps_per_epoch * args.grad_accum  # micro-batches per epoch
    lo, hi = first * args.grad_accum, last * args.grad_accum
    out = []
    for epoch in range(lo // per_epoch, (hi - 1) // per_epoch + 1):
        for b, rows in iterate_batches(examples, args.per_device_batch_size, args.grad_accum, args.seed, epoch,
                                       accelerator, start=max(lo - epoch * per_epoch, 0)):
            if epoch * per_epoch + b >= hi:
                break
            out.append((epoch, b, rows))
    return out


def rollout_temperature(args, epoch: int, b: int, accelerator) -> float:
    """The rollout temperature of one process's micro-batch b of `epoch`: ~ U(min, max), drawn from its own seed."""
    seed = args.seed * 1_000_003 + (epoch * 100_003 + b) * accelerator.num_processes + accelerator.process_index
    return random.Random(seed).uniform(args.rollout_min_temperature, args.rollout_max_temperature)


def pending_rollouts(rollout_policy: RolloutPolicy, ref_model, tokenizer, batches: list[tuple], slots: list[int], args,
                     accelerator) -> dict[tuple, list[dict]]:
    """Fresh rollouts, from the rollout policy as it is now, for the online slots of every micro-batch in `batches`
    ((epoch, b, rows) from `window_batches`): all of them in generate calls of --gen_batch_size sequences, each
    sequence at its micro-batch's temperature. Returns {(epoch, b): the rows for its slots, in slot order}. Each call
    is seeded by (seed, policy version, call, process): a resumed run that regenerates the window gets the same rows."""
    todo = [(epoch, b, rows[j], rollout_temperature(args, epoch, b, accelerator)) for epoch, b, rows in batches for j in slots]
    pending: dict[tuple, list[dict]] = {}
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # generation reseeds torch: leave the training stream (dropout) alone
        for c, s in enumerate(range(0, len(todo), args.gen_batch_size)):
            part = todo[s : s + args.gen_batch_size]
            sampling = dict(temperature=[t for *_, t in part], top_p=args.rollout_top_p, top_k=0)
            seed = args.seed * 1_000_003 + (rollout_policy.version * 100_003 + c) * accelerator.num_processes \
                + accelerator.process_index
            fresh = online_rollouts(rollout_policy.model, ref_model, tokenizer, [row for _, _, row, _ in part], args.task,
                                    sampling, args.max_new_tokens, seed)
            for (epoch, b, row, t), f in zip(part, fresh):
                pending.setdefault((epoch, b), []).append(dict(f, q0=row["q0"], temperature=t,
                                                               policy_version=rollout_policy.version))
    return pending


def main():
    # setup
    args, accelerator = start(Args, TINY, PAPER, CHECKS, check_flag_pairs)
    device = accelerator.device

    # models
    model, tokenizer = load_model_and_tokenizer(args.model, accelerator, args.lora_r, args.gradient_checkpointing)
    slots = online_slots(args.per_device_batch_size, args.online_fraction)  # rollouts per micro-batch and process
    n_online = len(slots)
    ref_model = frozen_copy(model, accelerator) if n_online and not args.lora_r else None
    rollout_policy = RolloutPolicy(model, args.model_update_interval, accelerator) if n_online else None
    pending = {}  # (epoch, b) -> this process's fresh rows for micro-batch b's online slots, from the last refresh
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    # data
    train_problems = load_task(args.task, "train", args.train_file, args.n_train_prompts)
    test_problems = load_task(args.task, "test", args.test_file, args.n_test)
    evaluation = dict(task=args.task, max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                      sampled_seeds=args.eval_seeds, seed=args.seed)  # every evaluation of this run
    results = {"reference": evaluate_reference(model, tokenizer, test_problems, accelerator, args.model, args.cache_dir,
                                               args.test_file, **evaluation, **PASS_EVAL,
                                               pass_problems=args.pass_eval_problems)}
    # ALGO LOGIC: data
    rows = build_offline_dataset(
        accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.n_samples,
        sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
        train_file=args.train_file, offline_data=args.offline_data, save_to=args.save_offline_data)
    more = build_offline_dataset(  # more samples for Ŝ_0: another seed, not exported
        accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.q0_samples,
        sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed + 1,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
        train_file=args.train_file, offline_data=args.offline_data) if args.q0_samples else []
    q0 = estimate_q0(rows + more, args.beta)  # prompt_idx -> Q̂_0
    examples = [dict(r, q0=q0[r["prompt_idx"]]) for r in rows]
    accelerator.print(f"training on {len(examples)} examples")
    accelerator.print(f"{args.online_fraction:.0%} of each batch fresh rollouts; mean Q̂_0 {sum(q0.values()) / len(q0):.4f}")
    token_fields, seq_fields = ("ref_logps",), ("q0", "reward")

    # training loop
    steps_per_epoch, total_steps = fit_to_data(len(examples), args, accelerator)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.warmup_steps)
    accelerator.register_for_checkpointing(scheduler, *([rollout_policy] if rollout_policy is not None else []))
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
            if n_online:  # ALGO LOGIC: the rows in the online slots become fresh rollouts of their prompts
                if (epoch, b) not in pending:  # first micro-batch after a refresh or a resume: the window's rollouts
                    first = rollout_policy.version  # the window is [refresh, next refresh), whatever --max_steps says
                    window = window_batches(examples, args, accelerator, steps_per_epoch, first,
                                            first + args.model_update_interval)
                    pending = pending_rollouts(rollout_policy, ref_model or accelerator.unwrap_model(model), tokenizer,
                                               window, slots, args, accelerator)
                fresh = iter(pending.pop((epoch, b)))
                batch_rows = [next(fresh) if j in slots else row for j, row in enumerate(batch_rows)]
            batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer.pad_token_id, token_fields,
                                                            seq_fields).items()}
            with accelerator.accumulate(model):
                policy_logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T)
                # ALGO LOGIC: loss
                loss, metrics = spo_loss(policy_logps, batch["ref_logps"], batch["q0"], batch["reward"] - 1, batch["mask"],
                                         args.beta, args.loss_type)  # r_spo = reward - 1 in {0, -1}; mean over sequences
                online = torch.tensor([bool(r.get("online")) for r in batch_rows], device=device)  # (B,)
                metrics.update({"charts/online_fraction": online.float().mean().item(), "rewards/online": batch["reward"][
                    online].mean().nan_to_num().item(), "charts/rollout_policy_step": min(
                    (r["policy_version"] for r in batch_rows if r.get("online")), default=0)})
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    metrics["charts/grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += batch["attention_mask"].sum().item()
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                if n_online:
                    rollout_policy.maybe_refresh(model, step)
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
    results["final"] = evaluate_run(model, tokenizer, test_problems, accelerator, **evaluation, **PASS_EVAL,
                                    pass_problems=args.pass_eval_problems)
    save_model(accelerator, model, tokenizer, os.path.join(args.output_dir, "model"))
    log_eval(accelerator, results, step, args.output_dir)  # results.json says "final" once the models are on disk
    accelerator.end_training()
    report_outputs(accelerator, args.output_dir)


if __name__ == "__main__":
    main()
