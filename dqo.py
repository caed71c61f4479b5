# Direct Q-function Optimization (DQO): https://arxiv.org/abs/2410.09302
"""DQO: offline soft Q-learning for multi-step reasoning, with the Q-function parameterised by the policy.

Each response token is an action a_h; the state s_h is the prompt plus the response tokens before a_h. A separate
value network V_φ (a copy of the base model with a scalar head) and the policy define the soft Q-function
    Q_θ(s_h, a_h) = β log π_θ(a_h | s_h) / π_ref(a_h | s_h) + V_φ(s_h),        V(s_{H+1}) = 0.
Over the offline dataset D of reference samples, with r_h the outcome reward (1/0) on the last response token plus
any process rewards, a bar meaning "detached" and μ the behaviour policy (default μ = π_ref):
    δ_h = r_h − β log π̄_θ/π_ref (a_h | s_h),      G_h = δ_h + (1 − λ) V̄(s_{h+1}) + λ G_{h+1},   G_{H+1} = 0
    w   = min(e, Π_h π̄_θ(a_h | s_h) / μ(a_h | s_h))                                  (per trajectory, detached)
    L_V(φ) = E_τ~D [ w Σ_h (Ḡ_h − V_φ(s_h))² ]
    L_π(θ) = E_τ~D [ w Σ_h (β log π_θ/π_ref (a_h | s_h) − (r_h + Ḡ_{h+1} − V̄(s_h)))² ]
With one token (H = 1) and μ = π_θ this is exactly DRO's squared residual (the paper's Remark 4.2). Process rewards
(--process_rewards, §5.5, Fig. 4): prefixes of whole segments of a failed response are completed by the reference,
longest first; the first with a correct completion marks its segments correct, each earning 1/n (n segments), as the
text says (Fig. 4's "all process reward to one" would give each segment 1, long correct responses outweighing short).

Launch:
    python dqo.py                                                    # embedded default: arith task, tiny model, CPU
    accelerate launch --config_file configs/fsdp.yaml dqo.py --model google/gemma-1.1-7b-it    # the paper's run, 8 GPUs
    python dqo.py --model google/gemma-1.1-7b-it --gradient_checkpointing --lora_r 16         # one GPU, bf16
    python dqo.py --process_rewards                                  # + process scores from prefix completions (§5.5)
    python eval.py --value_model runs/dqo/value_model --task arith   # value trace of a trained run (paper Table 4)

Deviations from the paper:
    - The λ-return is the normalised finite-horizon one (n-step returns weighted (1 − λ) λ^(n−1), the leftover λ^(H−h)
      on the Monte-Carlo return); Eq. 3.11 taken literally has weights summing to 1 − λ^(H−h). λ = 1 is the MC return.
    - V_φ's head (common.ValueModel) is initialised to zero, V ≡ 0 at the start; the paper does not say how.
    - Responses cut off at --max_new_tokens are kept, with reward 0, and treated as terminal.
    - log π_ref is the per-token reference log-prob stored with the offline dataset when it was sampled, so no
      reference model is kept in memory.
    - The tiny default (TINY) is tuned for the embedded task and its 538k-parameter model, with a far larger lr (and β)
      than the 7B run (PAPER); the README's results table gives what it reaches.
"""

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from common import (
    ValueModel,
    arith_first_wrong,
    build_offline_dataset,
    collate,
    evaluate_reference,
    evaluate_run,
    generate_batch,
    grade,
    iterate_batches,
    load_model_and_tokenizer,
    load_task,
    log_eval,
    reference_mode,
    segment_ends,
    throughput,
    token_logprobs,
)
from runtime.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint, save_model
from runtime.cli import Base, arg, at_least, between, one_of, positive
from runtime.files import cache_key, cached_chunks, model_key
from runtime.launch import fit_to_data, log_metrics, report_outputs, start
from runtime.sharding import unsharded


@dataclass
class Args(Base):
    output_dir: str = arg("runs/dqo", "where checkpoints, the final model, metrics and results go")
    beta: float | None = arg(None, "KL coefficient β")
    value_lr: float | None = arg(None, "value-network learning rate (the paper sweeps 5e-6 and 1e-6)")
    lam: float = arg(1.0, "λ of the λ-return (paper: 1.0, the Monte-Carlo return; Table 5 ablates it)")
    is_clip: float = arg(math.e, "importance weight min(is_clip, π/μ) per trajectory (paper: e); 0: no weights")
    no_is_policy: bool = arg(False, "drop the importance weight from the policy loss (paper Table 6)")
    no_is_value: bool = arg(False, "drop the importance weight from the value loss (paper Table 6)")
    behavior: str = arg("ref", "behaviour policy μ: ref (the stored reference log-probs, paper) or sampler (warped)")
    process_rewards: bool = arg(False, "add process rewards from prefix completions by the reference (paper §5.5)")
    ps_samples: int = arg(20, "completions sampled per prefix for the process scores")

    def memory_terms(self) -> dict:
        return dict(super().memory_terms(), networks=2)  # the policy and the value network


TINY = dict(n_train_prompts=1000, n_test=1000, epochs=1, lr=5e-5, value_lr=1e-3, per_device_batch_size=32, beta=0.3)
# PAPER (App. A, Gemma): β 0.03, lr 1e-7 (Qwen: 5e-7), λ 1, batch 256, 5 epochs (the best reported: Gemma's 2nd); value lr
# only swept ({5e-6, 1e-6}): 1e-6. Micro-batch and generation batch: what fits 80 GB at 7B (memory_plan), not paper values.
PAPER = dict(epochs=5, lr=1e-7, value_lr=1e-6, global_batch_size=256, per_device_batch_size=8, gen_batch_size=40, beta=0.03)

CHECKS = dict(value_lr=positive(), lam=between(0, 1), is_clip=(lambda v: v == 0 or v >= 1, "0 (no weights) or ≥ 1"),
              behavior=one_of("ref", "sampler"), ps_samples=at_least(1))


# ALGO LOGIC: loss
def lambda_returns(delta: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """The normalised finite-horizon λ-return, by a reverse scan over positions (vectorised over the batch):
        G_h = δ_h + (1 − λ) V_{h+1} + λ G_{h+1},    G_{H+1} = V_{H+1} = 0 (past each row's last response token)
    = Σ_n (1 − λ) λ^(n−1) G_h^(n) + λ^(H−h) G_h^MC, with n-step returns G_h^(n) = δ_h + ... + δ_{h+n−1} + V_{h+n}.
    delta, values, mask: (B, T), mask 1 on one contiguous run of response tokens per row. Returns G: (B, T), 0 off
    the mask. With λ = 1, G is the reverse cumulative sum of δ over the response."""
    next_g = next_v = delta.new_zeros(delta.shape[0])  # (B,)
    out = []
    for t in range(delta.shape[1] - 1, -1, -1):
        g = (delta[:, t] + (1 - lam) * next_v + lam * next_g) * mask[:, t]  # (B,)
        out.append(g)
        next_g, next_v = g, values[:, t] * mask[:, t]
    return torch.stack(out[::-1], dim=1)  # (B, T)


def dqo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, behavior_logps: torch.Tensor, values: torch.Tensor,
             rewards: torch.Tensor, mask: torch.Tensor, beta: float, lam: float, is_clip: float | None,
             is_policy: bool = True, is_value: bool = True) -> tuple[torch.Tensor, dict]:
    """DQO's policy and value losses (both to minimise). A bar means detached; ℓ = policy_logps, ℓ_ref = ref_logps,
    μ = behavior_logps, V = values, r = rewards:
        δ_h = r_h − β (ℓ̄_h − ℓ_ref,h),    G_h = δ_h + (1 − λ) V̄_{h+1} + λ G_{h+1},   G_{H+1} = V̄_{H+1} = 0
        w   = exp(min(log is_clip, Σ_h (ℓ̄_h − μ_h)))           (per trajectory; w = 1 if is_clip is None)
        value_loss  = mean_τ [ w · Σ_h (Ḡ_h − V_h)² ]                              (gradient only into V)
        policy_loss = mean_τ [ w · Σ_h (β (ℓ_h − ℓ_ref,h) − (r_h + Ḡ_{h+1} − V̄_h))² ]   (gradient only into ℓ)
    Arguments, in the order all six losses share (per-token tensors, then `mask`, then scalars): all tensors (B, T),
    aligned to sequence positions: position t holds log p(x_t | x_<t), V(s_t) of the state before token t, and r_t the
    reward for token t (the outcome on the last response token, plus process rewards). mask: 1 on one contiguous run
    of response tokens per row. `is_policy` / `is_value` False drop w from that loss (Table 6).
    With λ = 1 the two residuals are the same number with opposite signs (G_h = δ_h + G_{h+1}), so the losses are equal
    in value whenever both or neither carry w; they differ in where the gradient goes.
    Returns (loss, metrics), as all six losses do: `loss` = policy_loss + value_loss, the scalar to minimise (each term
    reaches only its own network); `metrics` floats, except `losses/policy` and `losses/value`, the two terms as scalar
    tensors (the training loop averages them over processes before logging)."""
    mask = mask.to(policy_logps.dtype)
    log_ratio = (policy_logps - ref_logps) * mask  # (B, T)
    delta = (rewards - beta * log_ratio.detach()) * mask  # (B, T) KL-shaped reward
    v_bar = values.detach() * mask  # (B, T)
    G = lambda_returns(delta, v_bar, mask, lam)  # (B, T), detached: built from detached inputs only
    G_next = torch.cat([G[:, 1:], G.new_zeros(G.shape[0], 1)], dim=1)  # (B, T) G_{h+1}, 0 after the last token
    ones = policy_logps.new_ones(policy_logps.shape[0])  # (B,)
    log_w = ((policy_logps.detach() - behavior_logps) * mask).sum(1).clamp(max=math.log(is_clip or 1))  # (B,)
    w = log_w.exp() if is_clip else ones  # (B,)
    value_err = ((G - values) ** 2 * mask).sum(1)  # (B,)
    policy_err = ((beta * log_ratio - (rewards + G_next - v_bar)) ** 2 * mask).sum(1)  # (B,)
    value_loss = ((w if is_value else ones) * value_err).mean()
    policy_loss = ((w if is_policy else ones) * policy_err).mean()
    first = mask.argmax(1, keepdim=True)  # (B, 1) first response position
    v_first = v_bar.gather(1, first).squeeze(1)  # (B,) V(s_1)
    metrics = {"losses/policy": policy_loss, "losses/value": value_loss, "charts/is_weight": w.mean().item(),
               "rewards/return": (rewards * mask).sum(1).mean().item(), "rewards/kl": log_ratio.detach().sum(1).mean().item(),
               "charts/is_clipped": (log_w >= math.log(is_clip)).float().mean().item() if is_clip else 0.0,
               "charts/value_first": v_first.mean().item(), "charts/G_first": G.gather(1, first).mean().item()}
    # the weight and V(s_1) on correct and on failed responses, apart: what the weight on the value loss does to V
    # (a failed response's return is < 1: process rewards give it at most (n − 1)/n)
    correct = (rewards * mask).sum(1) >= 1  # (B,)
    for name, sel in (("correct", correct), ("failed", ~correct)):
        if sel.any():
            metrics[f"charts/is_weight_{name}"] = w[sel].mean().item()
            metrics[f"charts/value_first_{name}"] = v_first[sel].mean().item()
    return policy_loss + value_loss, metrics


# Process rewards (DQO paper §5.5): the correct leading segments of each response, from prefix completions
PS_CHUNK = 64  # responses per cached process-score chunk


def token_rewards(n_tokens: int, reward: float, score: dict | None = None) -> list[float]:
    """Per-token rewards of one response: the outcome reward on its last token, plus 1/n on the last token of each
    of its correct leading segments (n segments)."""
    r = [0.0] * n_tokens
    r[-1] += reward
    if score:
        for e in score["segment_ends"][: score["correct_segments"]]:
            r[e - 1] += 1 / len(score["segment_ends"])
    return r


def score_segments(policy, tokenizer, rows: list[dict], task: str, ps_samples: int, sampling: dict, max_new_tokens: int,
                   gen_batch_size: int, seed: int) -> list[dict]:
    """Per response, its segment ends and the number of leading segments judged correct. Correct responses: all n.
    Failed ones: for k = n − 1, n − 2, ..., 1, sample `ps_samples` completions of the prompt plus the first k segments
    from `policy`; the first (longest) prefix with at least one correct completion marks its k segments correct.
    All still-undecided responses of `rows` go through one prefix length per round, in batches of `gen_batch_size`."""
    ends = [segment_ends(tokenizer, r["response_ids"]) for r in rows]
    correct = [len(e) if r["reward"] == 1.0 else 0 for r, e in zip(rows, ends)]
    k = [len(e) - 1 for e in ends]  # candidate prefix length, in segments
    pending = [i for i, r in enumerate(rows) if r["reward"] != 1.0 and k[i] >= 1]
    for rnd in range(max(k, default=0)):
        if not pending:
            break
        torch.manual_seed(seed * 1_009 + rnd)
        prefixes = [rows[i]["response_ids"][: ends[i][k[i] - 1]] for i in pending]
        flat = [j for j in range(len(pending)) for _ in range(ps_samples)]
        hit = [False] * len(pending)
        for s in range(0, len(flat), gen_batch_size):
            idx = flat[s : s + gen_batch_size]
            budget = max(1, max_new_tokens - min(len(prefixes[j]) for j in idx))
            outs = generate_batch(policy, tokenizer, [rows[pending[j]]["prompt_ids"] + prefixes[j] for j in idx],
                                  max_new_tokens=budget, **sampling)
            for j, o in zip(idx, outs):
                if not hit[j]:
                    text = tokenizer.decode(prefixes[j] + o["response_ids"], skip_special_tokens=True)
                    hit[j] = grade(text, rows[pending[j]]["answer"], task) == 1.0
        for j, i in enumerate(pending):
            correct[i] = k[i] if hit[j] else 0
            k[i] -= 0 if hit[j] else 1
        pending = [i for j, i in enumerate(pending) if not hit[j] and k[i] >= 1]
    return [{"segment_ends": e, "correct_segments": c} for e, c in zip(ends, correct)]


def build_process_scores(accelerator, model, tokenizer, rows: list[dict], task: str, ps_samples: int, sampling: dict,
                         max_new_tokens: int, gen_batch_size: int, seed: int, cache_dir: str, reference: str) -> list[dict]:
    """`score_segments` for every offline row, by the reference (`model` before training, prepared or not), cached
    under `cache_dir/process_scores/<key>/` (runtime/files.py: chunks of PS_CHUNK rows shared across processes and runs,
    verified), keyed by the reference's identity (`reference`, runtime.files.model_key), the offline rows themselves and the
    sampling parameters (accelerator None: one process)."""
    key = dict(model=reference, task=task, rows=cache_key([[r["prompt_ids"], r["response_ids"]] for r in rows]),
               ps_samples=ps_samples, temperature=sampling["temperature"], top_p=sampling["top_p"],
               top_k=sampling["top_k"], max_new_tokens=max_new_tokens, seed=seed, chunk=PS_CHUNK,
               gen_batch_size=gen_batch_size, v=3)
    chunks = [range(s, min(s + PS_CHUNK, len(rows))) for s in range(0, len(rows), PS_CHUNK)]
    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        parts, root = cached_chunks(
            accelerator, os.path.join(cache_dir, "process_scores"), key, [len(chunk) for chunk in chunks],
            lambda c: score_segments(policy, tokenizer, [rows[i] for i in chunks[c]], task, ps_samples, sampling,
                                     max_new_tokens, gen_batch_size, seed * 1_000_003 + c), "process scores")
    scores = [s for part in parts for s in part]
    failed = [(r, s) for r, s in zip(rows, scores) if r["reward"] != 1.0]
    n_ok, n_seg = sum(s["correct_segments"] for _, s in failed), sum(len(s["segment_ends"]) for _, s in failed)
    msg = (f"process scores: {sum(s['correct_segments'] > 0 for _, s in failed)}/{len(failed)} failed responses have a "
           f"correct prefix, {n_ok / max(1, n_seg):.3f} of their segments judged correct")
    if task == "arith":  # the verifier knows the first wrong step: segment i is step i, the last one the answer
        match = [arith_first_wrong(r) == s["correct_segments"] for r, s in failed]
        msg += f"; the first segment judged wrong is the verifier's first wrong step in {sum(match) / max(1, len(match)):.3f}"
    if accelerator is None or accelerator.is_main_process:
        print(f"{msg} ({root})")
    return scores


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
    rows = build_offline_dataset(
        accelerator, model, tokenizer, train_problems, model_name=args.model, task=args.task, n=args.n_samples,
        sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), seed=args.seed,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache_dir=args.cache_dir,
        train_file=args.train_file, offline_data=args.offline_data, save_to=args.save_offline_data)
    scores = [None] * len(rows)
    if args.process_rewards:
        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        scores = build_process_scores(accelerator, model, tokenizer, rows, args.task, args.ps_samples, sampling,
                                      args.max_new_tokens, args.gen_batch_size, args.seed, args.cache_dir,
                                      model_key(args.model, args.cache_dir, args.precision))
    examples = [dict(r, behavior_logps=r[f"{args.behavior}_logps"],
                     rewards=token_rewards(len(r["response_ids"]), r["reward"], sc))
                for r, sc in zip(rows, scores)]  # every response
    accelerator.print(f"training on {len(examples)} examples")
    token_fields, seq_fields = ("ref_logps", "behavior_logps", "rewards"), ()

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
                loss, metrics = dqo_loss(policy_logps, batch["ref_logps"], batch["behavior_logps"], values, batch["rewards"],
                                         batch["mask"], args.beta, args.lam, args.is_clip or None, not args.no_is_policy,
                                         not args.no_is_value)
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
                bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.4f}" for k in ("losses/policy", "rewards/kl",
                                                                                 "charts/is_weight")})
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
    accelerator.print(f"value trace: python eval.py --value_model {os.path.join(args.output_dir, 'value_model')}")
    accelerator.end_training()
    report_outputs(accelerator, args.output_dir)


if __name__ == "__main__":
    main()
