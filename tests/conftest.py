"""Shared fixtures of every test folder: a tiny Llama (grouped-query attention) built in code,
saved beside the real SmolLM2 tokenizer (oneshot reloads config and tokenizer from the model's
folder). Plain helper functions are in the ``support`` package beside this file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy 2-core machine two threads
    per process were seen to run 50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real model's converted HF folder (converted once into the user cache)."""
    from svdllm_plugin.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))


@pytest.fixture(scope="session")
def tiny_factory(tokenizer):
    """``tiny_factory(hidden=64, layers=2, seed=0, **config_overrides)``: a tiny Llama (GQA,
    4 heads / 2 KV heads, intermediate 2 x hidden, tied embeddings) with the SmolLM2 tokenizer's
    vocabulary unless ``vocab_size`` is given. The one model factory of the suite."""

    def make(hidden: int = 64, layers: int = 2, seed: int = 0, **overrides):
        vocab_size = overrides.pop("vocab_size", len(tokenizer))
        return tiny_llama(vocab_size, hidden=hidden, layers=layers, seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def save_tiny(tiny_factory, tokenizer):
    """``save_tiny(folder, **tiny_factory_kwargs) -> folder``: a tiny Llama saved with the SmolLM2
    tokenizer (oneshot and the CLI re-read config and tokenizer from the model's folder)."""

    def save(folder, **kwargs) -> Path:
        tiny_factory(**kwargs).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return Path(folder)

    return save


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, save_tiny) -> Path:
    """A saved tiny Llama (GQA: 4 heads, 2 KV heads) with the SmolLM2 tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def calib(tokenizer):
    """8 samples x 32 tokens of the embedded calibration text."""
    from svdllm_plugin.data import calibration_dataset, load_text

    return calibration_dataset(tokenizer, load_text(None, "calibration"), num_samples=8, seq_len=32)


@pytest.fixture
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True, scope="session")
def _no_stray_files():
    """Tests must not leave files in the working tree."""
    root = Path(__file__).resolve().parents[1]
    before = set(os.listdir(root))
    yield
    stray = set(os.listdir(root)) - before
    assert not stray, f"tests left files in the repo root: {sorted(stray)}"
