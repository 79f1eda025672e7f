"""One rank of tests/test_distributed.py's factor tests, started by ``torchrun --nproc-per-node 2``.

Usage: ``distributed_worker.py MODEL_DIR OUT_DIR CASES_JSON``. For each case
``{key: SVDLLMModifier settings}``: calibrate on this rank's share of the 8 x 32 calibration samples, save
the checkpoint from rank 0 into OUT_DIR/key, and write what this rank holds
(every SVDLinear's W_u W_v and the modifier's records) to OUT_DIR/key-rank<r>.pt.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, out_dir: str, cases: dict[str, dict]) -> None:
    torch.set_num_threads(1)
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import svdllm_plugin  # noqa: F401
    from svdllm_plugin import distributed
    from svdllm_plugin.checkpoint import save_pretrained
    from svdllm_plugin.data import calibration_dataset, load_text
    from svdllm_plugin.layers import SVDLinear
    from svdllm_plugin.modifiers.svd import SVDLLMModifier

    assert distributed.init_process_group() and distributed.is_distributed()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = int(os.environ.get("SVDLLM_TEST_SAMPLES", "8"))  # 7: an uneven split (3 / 4)
    calib = calibration_dataset(tokenizer, load_text(None, "calibration"), num_samples=samples, seq_len=32)
    calib = distributed.rank_partition(calib)
    for key, settings in cases.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        modifier = SVDLLMModifier(**settings)
        oneshot(
            model=model, dataset=calib, recipe=modifier, num_calibration_samples=len(calib), max_seq_length=32
        )
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
        products = {n: m.dense().detach().clone() for n, m in layers.items()}
        torch.save(
            {"products": products, "records": modifier.records, "samples": len(calib)},
            f"{out_dir}/{key}-rank{dist.get_rank()}.pt",
        )
        distributed.save_on_source(save_pretrained, model, f"{out_dir}/{key}", tokenizer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
