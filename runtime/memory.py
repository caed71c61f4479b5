"""The memory plan (bytes per GPU of each step, from the model config and `Base.memory_terms`) and the preflights."""

from common import SCORE_MAX_TOKENS, TINY_SHIPPED
from runtime.cli import ArgumentError


def param_count(config: dict) -> tuple[int, int]:
    """(parameters of the causal LM, of one decoder layer) of a Llama/Gemma-style config (no attention biases)."""
    V, H, F, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    layer = 2 * H * q + 2 * H * kv + 3 * H * F + 2 * H  # q and o, k and v, gate/up/down, two norms
    return L * layer + V * H * (1 if config.get("tie_word_embeddings", True) else 2) + H, layer


def kv_bytes_per_token(config: dict, bytes_per_value: int = 2) -> int:
    """KV-cache bytes per token: K and V of every layer, in bf16 by default."""
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * bytes_per_value


def memory_plan(config: dict, terms: dict, world: int, per_device_batch_size: int, gen_batch_size: int,
                prompt_tokens: int, max_new_tokens: int, sharded: bool = True, precision: str = "bf16", lora_r: int = 0,
                n_samples: int = 20) -> dict[str, dict[str, float]]:
    """Peak bytes on one GPU in each step ("train", "generate", "score", "save"; with a rollout policy "rollout" and
    "refresh"), by component, under configs/fsdp.yaml (FSDP2 over `world` GPUs, bf16 over fp32 masters) or, `sharded`
    False, whole models on every GPU; each step within 10% of the fake-tensor trace (tests/test_memory_plan.py)."""
    V, H, F, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    params, layer = param_count(config)
    value_params = params - (0 if config.get("tie_word_embeddings", True) else V * H) + H + 1  # backbone, scalar head
    trained = [params] + [value_params] * (terms.get("networks", 1) - 1)
    w = 2 if precision == "bf16" else 4  # bytes per parameter and activation in the compute dtype
    shards, T = world if sharded else 1, prompt_tokens + max_new_tokens
    N = per_device_batch_size * T * terms.get("rows_per_example", 1)  # e.g. pairs: chosen and rejected
    adapters = lora_r * L * (2 * (H + q) + 2 * (H + kv) + 3 * (H + F))  # A and B of q, o, k, v, gate, up, down
    if lora_r:  # the frozen base of each network (the value network's own copy of the backbone) and fp32 adapters
        state = {"frozen base weights": sum(w * p / shards for p in trained),
                 "LoRA adapters and Adam moments (fp32)": 12 * adapters * len(trained) / shards}
        grads = {"LoRA gradients (fp32)": 4 * adapters * len(trained) / shards}
    else:
        state = {"weights (fp32" + (", sharded)" if sharded else ")"): sum(4 * p / shards for p in trained),
                 "Adam moments (fp32)": sum(8 * p / shards for p in trained)}
        grads = {"gradients (fp32)": sum(4 * p / shards for p in trained)}
        if not sharded and world > 1:
            grads["DDP gradient buckets (fp32)"] = sum(4 * p for p in trained)
    if terms.get("frozen_reference") and not lora_r:  # with LoRA the reference is the base, adapters off
        state["frozen reference"] = w * params
    if terms.get("rollout_policy"):
        state["frozen rollout policy"] = w * params + (4 * adapters if lora_r else 0)
    gathered = {"policy gathered": w * params} if sharded else {}  # unsharded: the weights are already whole

    def generate(n: int) -> dict:  # the KV cache, growing one layer's K or V at a time, and the sampler's logits
        return {"KV cache": n * T * kv_bytes_per_token(config, w) * (1 + 1 / (2 * L)), "sampling logits and warps": n * V * 8}

    def score(rows: int) -> dict:  # one forward of up to SCORE_MAX_TOKENS tokens: the MLP's three (tokens, F) tensors
        tokens = min(rows, max(1, SCORE_MAX_TOKENS // T)) * T
        return {"forward activations (no grad)": tokens * (3 * F + 4 * H) * w}

    head32 = {"the log-prob head's fp32 copy of the output weight": 4 * V * H}  # common._chunk_logprobs, transient

    # the peak is at the backward of a network's embedding: its checkpointed layer inputs, accelerate's embedding/head/norm
    # unit of every network gathered (it stays gathered through forward), that unit's gradient with the fp32 copy the
    # reduce-scatter takes and, with two networks, the other one's embedding gradient and a layer's reduce-scatter
    train = {**state, **grads, "checkpointed layer inputs and outputs": (1 if sharded else len(trained)) * (L + 6) * N * H * w,
             **head32}
    if sharded:
        train.update({"embedding/head units gathered": len(trained) * V * H * w,
                      "embedding gradient and its fp32 reduce-scatter": V * H * (w + 4)})
        if len(trained) > 1:
            train["the other network's embedding gradient, a layer's reduce-scatter"] = V * H * w + 4 * layer
    rows_per_chunk = max(1, gen_batch_size // n_samples) * n_samples  # an offline-dataset chunk: whole prompts
    plan = {"train": train,
            "generate": {**state, **gathered, **generate(gen_batch_size)},
            "score": {**state, **gathered, **score(rows_per_chunk), **head32},
            "save": {**state, "one parameter gathered (fp32)": 4 * max(V * H, layer // L if L else 0)}}
    if terms.get("rollout_policy"):
        plan["rollout"] = {**state, **generate(gen_batch_size), **score(terms.get("online_rows", 0))}
        plan["refresh"] = {**state, **gathered}
    return plan


MEMORY_MARGIN_BYTES = 8e9  # left free on each GPU for what no plan sees: CUDA context, NCCL, fragmentation, workspaces
PREFLIGHT_PROMPT_TOKENS = 320  # the longest GSM8K prompt (template and chat markup included); MATH's are shorter


def read_model_config(model: str) -> dict:
    """What `memory_plan` reads of a model's config (`tiny`: assets/tiny; else AutoConfig), without its weights."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(TINY_SHIPPED if model == "tiny" else model).get_text_config()
    except (OSError, ValueError) as e:  # no network, an unknown or gated hub id, an unknown architecture: one line
        raise ArgumentError(f"--model {model}: its config cannot be read ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]}); pass a local save_pretrained folder, or "
                            "check the hub id and the network (README: Real models)") from None
    return {**{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads")},
            "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", True))}


def memory_preflight(name: str, terms: dict, model_config: dict, world: int, sharding: str | None, precision: str,
                     per_device_batch_size: int, gen_batch_size: int, max_new_tokens: int, lora_r: int,
                     device_bytes: int | None, skip: bool, n_samples: int = 20) -> str:
    """The plan's peak GB per GPU of each step; ArgumentError naming the step and the fixes if one does not fit the GPU
    (less MEMORY_MARGIN_BYTES or 10%), unless `skip`."""
    plan = memory_plan(model_config, terms, world, per_device_batch_size, gen_batch_size, PREFLIGHT_PROMPT_TOKENS,
                       max_new_tokens, sharded=sharding is not None, precision=precision, lora_r=lora_r, n_samples=n_samples)
    need = {step: sum(parts.values()) for step, parts in plan.items()}
    how = f"{world} process(es), {sharding or 'no sharding'}, {precision}" + (f", LoRA r={lora_r}" if lora_r else "")
    steps = ", ".join(f"{step} {b / 1e9:.1f}" for step, b in need.items())
    if device_bytes is None:
        return f"memory plan ({how}), GB per device: {steps}; no GPU: nothing checked"
    avail = device_bytes - min(MEMORY_MARGIN_BYTES, 0.1 * device_bytes)
    text = f"memory plan ({how}), GB per GPU of {device_bytes / 1e9:.0f}: {steps}"
    step, worst = max(need.items(), key=lambda kv: kv[1])
    if worst <= avail:
        return text + f"; fits (at most {avail / 1e9:.1f} GB)"
    batch, gen = "a smaller --per_device_batch_size (the global batch stays)", "a smaller --gen_batch_size"
    fixes = (["shard the models: `accelerate launch --config_file configs/fsdp.yaml`"] if sharding is None and world > 1
             else []) + ([gen, batch] if step == "generate" else [batch, gen]) + ([] if lora_r else ["--lora_r 16"])
    message = (f"{name}: the {step} step needs {worst / 1e9:.1f} GB per GPU, {avail / 1e9:.1f} GB available "
               f"({how}; {steps}). Fixes: " + "; ".join(fixes) + ". --skip_memory_check runs it anyway")
    if skip:
        return text + f"; warning (--skip_memory_check): {message}"
    raise ArgumentError(message)


def host_ram_preflight(name: str, terms: dict, model_config: dict, local_world: int, sharding: str | None, precision: str,
                       lora_r: int, host_bytes: int, skip: bool) -> str:
    """Host RAM of a node while every process loads the model (fp32 weights: FSDP2 upcasts on the host), or raise."""
    params, w, value = param_count(model_config)[0], 2 if precision == "bf16" else 4, terms.get("networks", 1) > 1
    per_process = w * params * (1 + value) if lora_r else 4 * params + (params * (w if sharding else 4) if value else 0)
    need = local_world * per_process
    text = (f"host RAM while loading: {local_world} x {per_process / 1e9:.1f} GB = {need / 1e9:.1f} GB of "
            f"{host_bytes / 1e9:.0f} GB")
    if need <= 0.9 * host_bytes or skip:
        return text + ("" if need <= 0.9 * host_bytes else " (over 90%: --skip_memory_check)")
    raise ArgumentError(f"{name}: {text}: every process loads the model itself. Fixes: fewer processes per node, "
                        "--lora_r 16; --skip_memory_check runs it anyway")

