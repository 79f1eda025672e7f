"""SVD-LLM through llm-compressor's own `oneshot`, top to bottom: load, data, recipe,
oneshot, generate, save, reload.

    .venv/bin/python integrations/llmcompressor/oneshot_svdllm.py [--model M] [--output DIR]
"""

import argparse

import torch
from llmcompressor import oneshot

import svdllm_plugin  # noqa: F401  (registers SVDLLMModifier with llmcompressor's recipe parser)
from svdllm_plugin.checkpoint import load_pretrained, save_pretrained
from svdllm_plugin.data import calibration_dataset, load_text
from svdllm_plugin.models import load_model_and_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--output", default="outputs/oneshot-svdllm")
args = parser.parse_args()

# 1. load a model (alias, local HF folder or hub id)
model, tokenizer = load_model_and_tokenizer(args.model)

# 2. calibration data: 32 windows of 256 tokens of the embedded text (or a file / hub name)
dataset = calibration_dataset(tokenizer, load_text(None, "calibration"), num_samples=32, seq_len=256)

# 3. the recipe: the same YAML a recipe file holds
recipe = """
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.2
      whitening: cholesky
"""

# 4. compress
oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
        num_calibration_samples=len(dataset), max_seq_length=256)

# 5. generate
chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**chat, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))

# 6. save (safetensors + ranks in config.json) and reload
save_pretrained(model, args.output, tokenizer, overwrite=True)
reloaded = load_pretrained(args.output)
print("reloaded", type(reloaded).__name__, "from", args.output)
