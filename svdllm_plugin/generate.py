"""Greedy chat generation from a model or compressed folder (``svdllm generate``)."""

from __future__ import annotations

__all__ = ["generate_reply"]


def generate_reply(
    model: str,
    prompt: str,
    max_new_tokens: int = 64,
    bnb: str | None = None,
    device: str | None = None,
    decode: str = "auto",
) -> str:
    """The greedy reply of the model or folder ``model`` to the user message ``prompt`` (its chat
    template applied when it has one). ``bnb`` ("nf4", "int8") converts every Linear, the SVD
    factors included, to bitsandbytes first; ``decode="graph"`` uses a static KV cache and a
    compiled decode step, ``"auto"`` does so on CUDA (not with bnb or a latent KV cache)."""
    import torch

    from svdllm_plugin.compress import check_device
    from svdllm_plugin.models import load_model_and_tokenizer

    device = check_device(device)
    lm, tokenizer = load_model_and_tokenizer(model)
    if bnb:
        from svdllm_plugin.export.bitsandbytes import to_bitsandbytes

        lm = to_bitsandbytes(lm, bnb)
    lm.to(device)
    latent = getattr(lm, "_svdllm_latent_cache", None) is not None  # a folder's load-time option
    if decode == "graph" or (decode == "auto" and str(device).startswith("cuda") and not (bnb or latent)):
        from svdllm_plugin.inference.graph import enable_graph_decode

        enable_graph_decode(lm, device=device)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(lm.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
