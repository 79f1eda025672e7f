"""The latent KV cache on every attention layout it accepts, with SHARP attention.

With near-uniform random attention, wrong keys barely change the output, so each model here has
its q/k weights scaled x30: attention then picks few positions and a wrong rebuilt key changes
greedy tokens. Each accepted layout must decode exactly what the ordinary cache decodes (tokens,
and logits to float rounding), through ``enable_latent_kv_cache`` and ``generate()``; the
layouts the cache cannot rebuild exactly are refused with one line naming the reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from support.factors import factorize_ratio, greedy
from transformers import DynamicCache

from svdllm_plugin.inference import enable_latent_kv_cache
from svdllm_plugin.inference.latent_cache import SUPPORTED_ATTENTION

SHAPE = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
ACCEPTED = {  # config class -> overrides; every SUPPORTED_ATTENTION entry is covered
    "LlamaConfig": {},
    "MistralConfig": {"sliding_window": 8},  # shorter than the text: windows of a full-length cache
    "Qwen2Config": {},
    "GraniteConfig": {},
    "CohereConfig": {},  # interleaved rotate_half
    "SmolLM3Config": {
        "no_rope_layers": [1, 0, 1],
        "use_sliding_window": False,
        "pad_token_id": 0,
    },  # layer 1 has no RoPE
}
REFUSED = {
    "Qwen3Config": ({}, "k_norm"),
    "CohereConfig": ({"use_qk_norm": True}, "k_norm"),
}


def sharp_model(config_name: str, overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**SHAPE, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(30.0)  # sharp attention: a wrong key changes which positions win
    return factorize_ratio(model, 0.3)


def test_every_supported_attention_is_tested():
    attention = {name.removesuffix("Config") + "Attention" for name in ACCEPTED}
    assert attention == set(SUPPORTED_ATTENTION)


@pytest.mark.parametrize("config_name", sorted(ACCEPTED))
def test_sharp_attention_decodes_as_the_ordinary_cache(config_name):
    model = sharp_model(config_name, ACCEPTED[config_name])
    prompt = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_logits = greedy(model, prompt, 48, DynamicCache(config=model.config))
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref_generated = model.generate(prompt[:1], **kwargs)
    _, make_cache = enable_latent_kv_cache(model)
    tokens, logits = greedy(model, prompt, 48, make_cache())
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        generated = model.generate(prompt[:1], **kwargs)  # picks the latent cache up by itself
    assert torch.equal(generated.sequences, ref_generated.sequences)
    torch.testing.assert_close(
        torch.stack(generated.logits), torch.stack(ref_generated.logits), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("config_name", sorted(REFUSED))
def test_layouts_that_transform_keys_are_refused(config_name):
    overrides, reason = REFUSED[config_name]
    model = sharp_model(config_name, overrides)
    with pytest.raises(ValueError, match=f"latent KV cache: .*{reason}") as error:
        enable_latent_kv_cache(model)
    assert "\n" not in str(error.value)
    assert not any(hasattr(m, "_svdllm_latent") for m in model.modules())  # refused before any hook
