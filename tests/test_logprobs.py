"""Tests for the per-token log-probs in common.py: `token_logprobs` against the naive full-logits computation on
small random Llama, Gemma, Gemma-2, Qwen2, Cohere and Granite models (values and gradients, with and without the
sampler warp, through peft, activation checkpointing and an autocast-wrapped forward), its memory bound, and
`score_rows`' micro-batches."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import common

V = 101
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2)
WARP = dict(temperature=0.7, top_k=20, top_p=0.9)
ARCHS = ("llama", "gemma", "gemma2", "qwen2", "cohere", "granite")


def build(arch: str, **overrides):
    """A small random model of `arch`. initializer_range 0.2 makes logits of a few nats, so that Gemma-2's soft-cap
    (0.5 of them here), Cohere's logit_scale and Granite's logits_scaling change them a lot."""
    import transformers as tf

    config_cls, model_cls, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {}),  # embeddings scaled by sqrt(hidden_size), tied head
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(final_logit_softcapping=2.0)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.25)),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=4.0)),
    }[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SMALL, **extra, **overrides})).eval()


def batch(B: int = 3, T: int = 13, vocab: int = V):
    """Random tokens, right-padded: row i has T - 3i real tokens (2 at least)."""
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        attn[i, max(2, T - 3 * i) :] = 0
    return ids, attn


def naive_logprobs(model, ids, attn, warp=None):
    """The common trainer pattern: the model's full (B, T, V) logits, log_softmax in fp32, gather. 0 at position 0 and
    at padding, as token_logprobs returns."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    if warp:
        logits = common.warp_logits(logits, **warp)
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    return torch.cat([torch.zeros(ids.shape[0], 1), torch.where(attn[:, 1:].bool(), lp, 0.0)], dim=1)


def grads(model, lp, weights):
    """Gradients of a weighted sum of the finite log-probs (the warp's -inf tokens left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((torch.where(torch.isfinite(lp), lp, 0.0) * weights).sum(), params)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) created by any op, and the dtypes of matmul outputs `V` wide."""

    def __init__(self):
        super().__init__()
        self.largest, self.head_dtypes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and t.shape[-1] == V:
                    self.head_dtypes.add(t.dtype)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Equality with the full-logits computation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warp", [None, WARP], ids=["plain", "warped"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_full_logits_values_and_grads(arch, warp):
    model = build(arch)
    ids, attn = batch()
    weights = torch.randn(ids.shape)
    ref = naive_logprobs(model, ids, attn, warp)
    g_ref = grads(model, ref, weights)
    for chunk_tokens in (None, 1, 5):  # the default is one chunk here; 5 does not divide the 27 real tokens
        got = common.token_logprobs(model, ids, attn, warp=warp, chunk_tokens=chunk_tokens)
        assert got.shape == ids.shape and got.dtype == torch.float32
        assert torch.all(got[:, 0] == 0) and torch.all(got[:, 1:][attn[:, 1:] == 0] == 0)  # position 0 and padding
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), finite)
        if warp:  # the warp cuts tokens: some log-probs are -inf
            assert not finite.all()
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads(model, got, weights), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("arch", ("gemma2", "cohere", "granite"))
def test_the_head_transform_matters(arch):
    """The equality test above can fail: without its soft-cap or scale, each model's log-probs are far off."""
    model = build(arch)
    ids, attn = batch()
    plain = build(arch, final_logit_softcapping=None, logit_scale=1.0, logits_scaling=1.0)
    assert (naive_logprobs(model, ids, attn) - naive_logprobs(plain, ids, attn)).abs().max() > 0.1


def test_no_grad_values_match_and_variants_share_one_forward():
    model = build("gemma2")
    ids, attn = batch()
    with torch.no_grad():
        plain, warped = common.token_logprob_variants(model, ids, attn, (None, WARP), chunk_tokens=4)
        ref, ref_warped = naive_logprobs(model, ids, attn), naive_logprobs(model, ids, attn, WARP)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(ref_warped)
    assert torch.equal(torch.isfinite(warped), finite)
    torch.testing.assert_close(warped[finite], ref_warped[finite], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_model_matches():
    model = build("gemma2").train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids, attn = batch()
    weights = torch.randn(ids.shape)
    got, ref = common.token_logprobs(model, ids, attn, chunk_tokens=4), naive_logprobs(model, ids, attn)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(model, got, weights), grads(model, ref, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_lora_model_matches_and_reference_mode_is_the_base():
    model = build("llama")
    ids, attn = batch()
    with torch.no_grad():
        base = naive_logprobs(model, ids, attn)
    lora = common.add_lora(model, 4)
    for name, p in lora.named_parameters():  # B starts at zero: move it, so the adapters change the log-probs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    weights = torch.randn(ids.shape)
    got, ref = common.token_logprobs(lora, ids, attn, chunk_tokens=4), naive_logprobs(lora, ids, attn)
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(lora, got, weights), grads(lora, ref, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with torch.no_grad(), common.reference_mode(lora):
        torch.testing.assert_close(common.token_logprobs(lora, ids, attn), base, rtol=1e-5, atol=1e-5)


def test_head_runs_under_the_forwards_autocast():
    """accelerate's mixed precision wraps the model's forward in autocast: the model's own lm_head (its last position)
    computes bf16 logits, the chunked head, which runs after the forward, fp32 ones (no logit rounded to bf16)."""
    model = build("gemma2")
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    ids, attn = batch()
    with torch.no_grad():
        ref = naive_logprobs(model, ids, attn)
        mode = LargestTensor()
        with mode:
            got = common.token_logprobs(model, ids, attn, chunk_tokens=4)
    assert mode.head_dtypes == {torch.bfloat16, torch.float32}
    torch.testing.assert_close(got, ref, rtol=0.0, atol=0.05)  # the reference's bf16 logits: a few hundredths of a nat


def test_an_unknown_head_transform_fails_loudly():
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):  # an architecture that does something more to its logits
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = Doubled(build("llama").config)
    ids, attn = batch()
    with pytest.raises(NotImplementedError, match="Doubled"):
        common.token_logprobs(model, ids, attn)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: never the (B, T, V) logits; chunks are a token budget, independent of B
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 8])
def test_no_tensor_bigger_than_one_chunk(B, monkeypatch):
    """A 32k vocabulary, bf16: no tensor of any dtype, in forward, checkpoint recompute or backward, is bigger than one
    chunk of 16 tokens' logits, for 1 or 8 rows (8: the default chunk, from LOGPROB_CHUNK_LOGITS). The naive way
    creates the (B, T, V) logits, which shows the measurement sees them."""
    vocab = 32000
    monkeypatch.setattr(common, "LOGPROB_CHUNK_LOGITS", 16 * vocab)
    model = build("llama", vocab_size=vocab, hidden_size=8, head_dim=2, intermediate_size=16).to(torch.bfloat16).train()
    ids, attn = batch(B, 64, vocab)
    measured = []
    for fn in (lambda: common.token_logprobs(model, ids, attn, chunk_tokens=16 if B == 1 else None),
               lambda: naive_logprobs(model, ids, attn)):
        mode = LargestTensor()
        with mode:
            lp = fn()
            g = torch.autograd.grad(lp.sum(), [model.model.layers[0].mlp.down_proj.weight, model.lm_head.weight])
        measured.append((mode.largest, lp, g))
    (largest, lp, g), (largest_ref, lp_ref, g_ref) = measured
    assert largest_ref >= B * 63 * vocab and largest <= 16 * vocab
    torch.testing.assert_close(lp, lp_ref, rtol=0.0, atol=0.1)  # bf16 logits either way
    for a, b in zip(g, g_ref):
        assert torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) > 0.99


# ---------------------------------------------------------------------------------------------------------------------
# score_rows: micro-batches bounded in tokens, same values
# ---------------------------------------------------------------------------------------------------------------------
def test_score_rows_micro_batches_bounded_in_tokens(monkeypatch):
    model = build("gemma2").train()
    rng = random.Random(0)
    rows = [{"prompt_ids": [rng.randrange(V) for _ in range(rng.randint(2, 6))],
             "response_ids": [rng.randrange(V) for _ in range(rng.randint(1, 20))]} for _ in range(11)]
    rows[4]["response_ids"] = list(range(40))  # longer than the budget: a micro-batch of its own
    shapes, real = [], common.token_logprob_variants

    def spy(model, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(common, "token_logprob_variants", spy)
    common.score_rows(model, rows, pad_token_id=0, warp=WARP, max_tokens=30)
    assert model.training  # the mode is restored
    assert sum(b for b, _ in shapes) == len(rows) and len(shapes) > 3
    assert all(b * t <= 30 or b == 1 for b, t in shapes) and any(b == 1 and t > 30 for b, t in shapes)
    model.eval()
    for r in rows:  # each row against the naive full-logits computation on that row alone
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        with torch.no_grad():
            for name, warp in (("logps", None), ("sampler_logps", WARP)):
                ref = naive_logprobs(model, ids, torch.ones_like(ids), warp)[0, p:]
                got = torch.tensor(r[name])
                assert len(r[name]) == n and torch.equal(torch.isfinite(got), torch.isfinite(ref))
                torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-5)
    again = [dict(prompt_ids=r["prompt_ids"], response_ids=r["response_ids"]) for r in rows]
    common.score_rows(model, again, pad_token_id=0)  # one micro-batch (the default budget): the same values
    for a, r in zip(again, rows):
        torch.testing.assert_close(torch.tensor(a["logps"]), torch.tensor(r["logps"]), rtol=1e-5, atol=1e-5)
        assert "sampler_logps" not in a


def test_warp_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 100) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, 16, 0.9), (0.9, 16, 0.9), (1.0, 0, 0.5), (0.4, 0, 0.95), (1.3, 5, 1.0),
                                      (1.0, 0, 1.0), (0.7, 1, 0.9)]:
        ref = TemperatureLogitsWarper(temperature)(ids, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(ids, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(ids, ref)
        got = common.warp_logits(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (temperature, top_k, top_p)
        torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)])
        assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_docs_carry_the_bf16_logprob_measurement():
    """docs/memory-and-time.md carries benchmarks/logprob_bf16.py's stored run (benchmarks/results/logprob_bf16.json),
    table for table; the README's line quotes its per-response errors at a 256k vocabulary and its memory against the
    floor; the adopted fp32 head cut them, and its memory stays within 1.5x the floor."""
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import logprob_bf16

    with open(os.path.join(root, "benchmarks", "results", "logprob_bf16.json")) as f:
        stored = json.load(f)
    with open(os.path.join(root, "docs", "memory-and-time.md")) as f:
        docs = f.read()
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    assert logprob_bf16.error_table(stored["errors"]) in docs
    if "memory" in stored:  # --skip_errors (minutes of bf16 matmuls on a CPU) stored too
        assert logprob_bf16.memory_table(stored["memory"], stored.get("memory_run")) in docs
    wide = stored["errors"]["wide (vocab 256000)"]
    bf16, fp32 = wide["bf16 logits"]["response_mean"], wide["fp32 logits"]["response_mean"]
    assert f"from {bf16:.2f} to {fp32:.2f} nats" in readme
    for r in stored["errors"].values():
        assert r["fp32 logits"]["response_mean"] < r["bf16 logits"]["response_mean"]
    if "memory" in stored:
        memory = stored["memory"]
        ratio = memory["token_logprobs"]["peak_bytes"] / memory["floor"]["peak_bytes"]
        assert ratio <= 1.5
        if logprob_bf16.COMPUTED in memory:  # measured with the head's matmuls zeroed: the same peak as computed
            assert memory[logprob_bf16.COMPUTED]["peak_bytes"] == pytest.approx(memory["token_logprobs"]["peak_bytes"],
                                                                                 rel=0.01)
        assert f"its log-prob memory {ratio:.2f}x the floor's" in readme
    else:
        assert "Not yet measured against the floor" in docs
