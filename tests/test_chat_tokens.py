"""Chat models end a turn with their own token, not EOS. Tiny local word-level tokenizers carry chat templates
written in the style of Gemma, Llama-3.1 and Qwen2, each with an end-of-turn token that differs from its EOS; a
hand-built "bigram" Llama answers every prompt with `#### 7` followed by a chosen closing token, deterministically."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import encode_response

import common
from benchmarks import tiny_reference

# Gemma-1.1-it and Gemma-2-it: `<bos>`, turns `<start_of_turn>{user|model}\n{content | trim}<end_of_turn>\n`, no
# system role, roles must alternate. Tokenizer EOS `<eos>` (id 1), end of turn `<end_of_turn>` (id 107).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Llama-3.1-Instruct: `<|begin_of_text|>`, a system header with the knowledge cutoff and date, then
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>` per message (`<|eom_id|>` ends a tool call).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' + system_message + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-Instruct (ChatML): a default system message, `<|im_start|>{role}\n{content}<|im_end|>\n` per message, no BOS.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Per family: special tokens in id order, the tokenizer's bos/eos/pad, the template's end of turn, and the model's
# generation_config.eos_token_id, as in the real releases:
# - Gemma-1.1-it's generation_config lists only `<eos>` (1): its end of turn comes from the template alone;
# - Gemma-2-it's lists [1, 107];
# - Llama-3.1-Instruct's lists [128001 `<|end_of_text|>`, 128008 `<|eom_id|>`, 128009 `<|eot_id|>`]; the tokenizer's
#   EOS here is `<|end_of_text|>`, as in Meta-Llama-3-8B-Instruct as first released (3.1-Instruct now says `<|eot_id|>`);
# - Qwen2-Instruct's lists [151645 `<|im_end|>`, 151643 `<|endoftext|>`]; the tokenizer's EOS here is `<|endoftext|>`, as
#   in the Qwen2 base models (Qwen2-Instruct's own is `<|im_end|>`, its end of turn).
FAMILIES = {
    "gemma-1.1": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                      bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>", template=GEMMA_TEMPLATE,
                      generation_eos=["<eos>"]),
    "gemma-2": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                    bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>", template=GEMMA_TEMPLATE,
                    generation_eos=["<eos>", "<end_of_turn>"]),
    "llama-3.1": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eom_id|>", "<|eot_id|>", "<unk>"],
                      bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>", end_of_turn="<|eot_id|>",
                      template=LLAMA3_TEMPLATE, generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
                  bos=None, eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|im_end|>", template=QWEN2_TEMPLATE,
                  generation_eos=["<|im_end|>", "<|endoftext|>"]),
}
ANSWER = "#### 7"  # a correct GSM8K-style answer to "7"; "####" is one word of these tokenizers, so no token repeats


def family_tokenizer(family: str):
    """A word-level tokenizer with the family's special tokens (all flagged special, as in the real tokenizers),
    single characters, `####` and a few words; anything else maps to `<unk>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    words = ["####", "user", "model", "assistant", "system"]
    chars = list("0123456789") + [" ", "\n"] + list(".,?'#+-*=:$()/")
    vocab = {t: i for i, t in enumerate(f["specials"] + chars + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"####|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    named = {"bos_token": f["bos"], "eos_token": f["eos"], "pad_token": f["pad"], "unk_token": "<unk>"}
    rest = [s for s in f["specials"] if s not in named.values()]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=rest,
                                        **{k: v for k, v in named.items() if v is not None})
    tokenizer.chat_template = f["template"]
    return tokenizer


def bigram_model(tokenizer, chain: dict[str, str], generation_eos: list[str]):
    """A one-layer Llama whose next token depends only on the current one: `chain[a]` follows `a`. The attention and
    MLP outputs are zeroed, so the residual stream is the one-hot embedding; the lm_head maps it to a logit of
    sqrt(hidden) for the successor and 0 for every other token. Greedy decoding then follows the chain exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = len(tokenizer)
    H = 4 * ((V + 3) // 4)  # two heads of an even size, for RoPE
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=H // 2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :V].copy_(torch.eye(V))
        for a, b in chain.items():
            model.lm_head.weight[ids(b), ids(a)] = 1.0
    model.generation_config.eos_token_id = [ids(t) for t in generation_eos]
    return model


def answering_model(family: str, closing: str):
    """The family's tokenizer and a model that answers `#### 7`, then `closing`, then (were it not stopped) starts
    over on a new line, forever."""
    tok = family_tokenizer(family)
    chain = {"\n": "####", "####": " ", " ": "7", "7": closing, closing: "\n"}  # every generation prompt ends with "\n"
    return tok, bigram_model(tok, chain, FAMILIES[family]["generation_eos"])


def gsm8k_prompts(tok):
    return [common.encode_prompt(tok, q, "gsm8k") for q in ("What is 3+4?", "Ann has 3 apples and gets 4 more. How many?")]


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_comes_from_the_template(family):
    tok, f = family_tokenizer(family), FAMILIES[family]
    eot = tok.convert_tokens_to_ids(f["end_of_turn"])
    assert eot != tok.eos_token_id and eot != tok.unk_token_id
    assert common.end_of_turn_id(tok) == eot
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=tok.convert_tokens_to_ids(f["generation_eos"])))
    assert common.stop_token_ids(model, tok) == {eot, tok.eos_token_id, *tok.convert_tokens_to_ids(f["generation_eos"])}

    response = encode_response(tok, ANSWER)
    assert response == tok(ANSWER, add_special_tokens=False)["input_ids"] + [eot]
    assert tok.decode(response, skip_special_tokens=True) == ANSWER
    # prompt + response is the template's own rendering of the conversation, up to the end of the assistant turn
    prompt = common.encode_prompt(tok, "What is 3+4?", "gsm8k")
    question = common.PROMPT_TEMPLATES["gsm8k"].format(problem="What is 3+4?")
    whole = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}],
                                    tokenize=False)
    whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
    assert whole_ids[: len(prompt) + len(response)] == prompt + response


@pytest.mark.parametrize("family,closing", [(f, FAMILIES[f]["end_of_turn"]) for f in FAMILIES]
                         + [("llama-3.1", "<|eom_id|>"), ("gemma-1.1", "<eos>")])
def test_generation_stops_where_the_turn_ends(family, closing):
    """Each closing token is a stop id (the end of turn from the template, Llama's `<|eom_id|>` from generation_config
    alone, plain EOS): generation stops there, not truncated, with the stop id stored and graded without it."""
    tok, model = answering_model(family, closing)
    stop_id = tok.convert_tokens_to_ids(closing)
    prompts = gsm8k_prompts(tok)
    assert len({len(p) for p in prompts}) == 2  # left-padded batch
    rows = common.rollout(model, tok, prompts, ["7", "7"], "gsm8k", temperature=0.0, max_new_tokens=12)
    for r in rows:
        assert r["response_ids"] == tok(ANSWER, add_special_tokens=False)["input_ids"] + [stop_id]
        assert r["finish"] == "stop" and not r["truncated"]
        assert r["response"] == ANSWER and r["reward"] == 1.0
    if closing == FAMILIES[family]["end_of_turn"]:  # generation and encoding agree on how a response ends
        assert all(r["response_ids"] == encode_response(tok, ANSWER) for r in rows)
    # Scoring covers the stop token too. By construction every step of the chain, ending the turn included, has the
    # final-norm logit s = 1/sqrt(1/H + eps) against 0 for the V - 1 others: log-prob -log(1 + (V - 1) e^-s).
    V, H, eps = model.config.vocab_size, model.config.hidden_size, model.config.rms_norm_eps
    expected = -math.log1p((V - 1) * math.exp(-1 / math.sqrt(1 / H + eps)))
    longest = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    common.score_rows(model, rows, tok.pad_token_id, max_tokens=2 * longest)  # micro-batches of 2 rows
    for r in rows:
        assert r["logps"] == pytest.approx([expected] * len(r["response_ids"]), rel=1e-4)


def test_without_the_end_of_turn_in_the_stop_set_the_model_runs_on():
    """The control that makes the test above able to fail: the same Gemma-1.1-style model, with the template gone (so
    the end of turn falls back to EOS) and generation_config listing only `<eos>`, runs past `<end_of_turn>` to the
    token limit, and is marked truncated, as every chat model did while EOS alone ended a response."""
    tok, model = answering_model("gemma-1.1", "<end_of_turn>")
    prompts = gsm8k_prompts(tok)
    tok.chat_template = None
    assert common.end_of_turn_id(tok) == tok.eos_token_id  # the cache is keyed by the template too
    assert common.stop_token_ids(model, tok) == {tok.eos_token_id}
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    for out in common.generate_batch(model, tok, prompts, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=12):
        assert out["finish"] == "length" and len(out["response_ids"]) == 12 and out["response_ids"][3] == eot


def test_stop_ids_from_an_int_a_list_or_no_generation_config():
    tok = family_tokenizer("gemma-1.1")
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    for config_eos, expected in ((eos, {eos, eot}), ([eos, eot], {eos, eot}), (None, {eos, eot}), (0, {0, eos, eot})):
        model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=config_eos))
        assert common.stop_token_ids(model, tok) == expected
    assert common.stop_token_ids(object(), tok) == {eos, eot}  # a module without a generation_config


def test_end_of_turn_is_derived_once_per_tokenizer(monkeypatch):
    tok = family_tokenizer("qwen2")
    calls = []
    render = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or render(*a, **k))
    for _ in range(50):
        assert encode_response(tok, ANSWER)[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(calls) == 1


def test_tiny_model_still_ends_responses_with_eos(tiny_model):
    """The embedded default's template closes an assistant turn with a plain newline, so its responses still end with
    `</s>` and generation stops only at it: the cached offline datasets and reference stay valid."""
    model, tok = tiny_model
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                       tokenize=False)
    assert rendered.endswith("<|assistant|>\na\n")
    eos = tok.convert_tokens_to_ids("</s>")
    assert tok.eos_token_id == eos and common.end_of_turn_id(tok) == eos
    assert common.end_of_turn_id(tiny_reference.build_tiny_tokenizer()) == eos  # and the builder's, before saving
    assert common.stop_token_ids(model, tok) == {eos}
    p = common.load_task("arith", "test", limit=1)[0]
    assert encode_response(tok, p["solution"]) == tok(p["solution"], add_special_tokens=False)["input_ids"] + [eos]
