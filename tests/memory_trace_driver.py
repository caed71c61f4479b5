"""Run by tests/test_memory_trace.py: the memory trace of a tiny DQO configuration on REAL tensors, on 2 gloo CPU
processes sharded by accelerate's FSDP2 code (benchmarks/memory_trace.py's `launch` and `prepare`), measured by the
same tracker. Rank 0 writes the result as JSON.

    torchrun --nproc_per_node 2 tests/memory_trace_driver.py OUT.json
"""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import memory_trace  # noqa: E402

# A Gemma of the tiny model's size, with head_dim and the tied embedding as Gemma-7B has them
TINY_GEMMA = dict(model_type="gemma", vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True)
SETTINGS = dict(config=TINY_GEMMA, world=2, per_device_batch_size=4, gen_batch_size=8, grad_accum=2, prompt_tokens=24,
                max_new_tokens=40)


def main():
    dist.init_process_group("gloo")
    result = memory_trace.trace("dqo", steps=("train", "generate", "score"), fake=False, **SETTINGS)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
