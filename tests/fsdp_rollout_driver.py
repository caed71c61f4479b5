"""Run by tests/test_sharding.py under `torchrun --nproc_per_node 2` (gloo, CPU): `common.rollout`, `common.evaluate`
and `common.build_offline_dataset` from a tiny Llama wrapped directly with torch FSDP2 (`fully_shard`) give the unsharded
model's tokens (and log-probs), with a different number of generate calls on each process, and leave the wrapped model
as they found it.

    torchrun --nproc_per_node 2 tests/fsdp_rollout_driver.py CACHE_DIR
"""

import copy
import os
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from benchmarks.tiny_reference import TINY_CONFIG, build_tiny_tokenizer  # noqa: E402


def wrap(model):
    """As accelerate does: each decoder layer its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def main():
    accelerator = Accelerator(cpu=True)  # gloo process group; rollout shares its chunks round-robin over the processes
    assert accelerator.num_processes == 2
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
    model = LlamaForCausalLM(config)  # random weights: the tokens only need to be equal, not right
    plain = copy.deepcopy(model)
    problems = common.arith_problems("test", 6)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    answers = [p["answer"] for p in problems]
    # 3 chunks of 2 prompts x n samples: process 0 generates twice, process 1 once
    runs = [dict(temperature=0.0, n=1, gen_batch_size=2), dict(temperature=0.9, top_p=0.9, top_k=16, n=2, gen_batch_size=4)]
    want = [common.rollout(plain, tokenizer, prompts, answers, "arith", max_new_tokens=24, seed=3, **kw) for kw in runs]
    sharded = wrap(model)
    got = [common.rollout(sharded, tokenizer, prompts, answers, "arith", max_new_tokens=24, seed=3, accelerator=accelerator,
                          **kw) for kw in runs]
    for w, g in zip(want, got):
        assert [r["response_ids"] for r in g] == [r["response_ids"] for r in w], "sharded tokens differ from unsharded"
        assert [r["reward"] for r in g] == [r["reward"] for r in w]
    kw = dict(max_new_tokens=24, gen_batch_size=4, sampled_seeds=2, pass_k=(1, 2), pass_n=2, seed=3)
    assert common.evaluate(sharded, tokenizer, problems, "arith", accelerator, **kw) == common.evaluate(
        plain, tokenizer, problems, "arith", **kw)
    # the offline dataset, in a cache of its own for each: same tokens, same reference and sampler log-probs
    datasets = []
    for name, m in (("plain", plain), ("sharded", sharded)):
        datasets.append(common.build_offline_dataset(
            accelerator, m, tokenizer, problems, model_name="tiny", task="arith", n=2, max_new_tokens=24, seed=5,
            sampling=dict(temperature=0.9, top_p=0.9, top_k=16), gen_batch_size=4, cache_dir=os.path.join(sys.argv[1], name)))
    assert len(datasets[0]) == 12 and [r["response_ids"] for r in datasets[0]] == [r["response_ids"] for r in datasets[1]]
    # measured: equal bit for bit (the same full parameters, shapes and process); 1e-5 allows a few float32 steps
    for a, b in zip(*datasets):
        torch.testing.assert_close(torch.tensor(b["ref_logps"]), torch.tensor(a["ref_logps"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(b["sampler_logps"]), torch.tensor(a["sampler_logps"]), rtol=1e-5, atol=1e-5)

    # the wrapped model is left as it was: sharded, its forward routed through FSDP, its outputs the plain model's
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        logits = sharded(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    from torch.distributed.tensor import DTensor

    # every layer resharded after that forward: its reshard-after-forward setting came back (the root keeps its own)
    assert all(isinstance(p, DTensor) for layer in sharded.model.layers for p in layer.parameters())
    assert all(p.to_local().numel() < p.numel() for layer in sharded.model.layers for p in layer.parameters())
    accelerator.wait_for_everyone()
    accelerator.print("FSDP2: sharded rollout, evaluate and offline dataset equal unsharded")
    accelerator.end_training()  # destroys the process group: a rank that exits with it alive can abort the other (gloo)


if __name__ == "__main__":
    main()
