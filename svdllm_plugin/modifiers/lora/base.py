"""SequentialLoRAModifier: SVD-LLM's LoRA fine-tuning of the factors, as an llm-compressor modifier.

SVD-LLM (ICLR version) recovers accuracy by LoRA on W_u with W_v frozen, merge, then LoRA on
W_v with W_u frozen, merge. ``order`` lists the rounds: ``["u", "v"]`` (default),
``["v", "u"]`` (the paper's text and tables disagree on which goes first), or ``["uv"]`` for
plain simultaneous LoRA on both factors (the paper's weaker baseline).

Lifecycle (llmcompressor calls these):
- on_initialize: find the SVDLinear layers (SVDLLMModifier, earlier in the recipe, has
  already built them, pending) and prepare the token windows, so a bad ``dataset``,
  ``tokenizer`` or ``targets`` fails before any calibration runs.
- on_calibration_start: refuse a pipeline shared with a later modifier that calibrates
  (GPTQ would quantize the factors before LoRA changes them).
- on_calibration_end: train. The modifier needs no calibration data, so oneshot's default
  ``independent`` pipeline gives it its own data-free turn (calibration_start,
  sequential_epoch_end, calibration_end), after SVDLLMModifier's turn (factors set and
  active) and before GPTQModifier's (which then quantizes the merged factors). Every
  pipeline fires calibration_end outside its no-grad ``calibration_forward_context``; and
  when SVDLLMModifier and this modifier share one pipeline, SVDLLMModifier switches its
  factors on in its own calibration_end, which comes first in recipe order.
"""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, ValidationInfo, model_validator
from torch import nn

from svdllm_plugin.layers import SVDLinear
from svdllm_plugin.modifiers.checks import Modules, PositiveInt, as_list
from svdllm_plugin.modifiers.lora.train import LoraSettings, RoundResult, train_round

__all__ = ["SequentialLoRAModifier"]

Round = Literal["u", "v", "uv"]
_FP16_NAMES = {"float16", "fp16", "half", "torch.float16"}


# ---- validation: one Annotated type per rule, its message naming the field and the fix -------
def _check_order(value: list[str]) -> list[str]:
    if not value:
        raise ValueError('`order` needs at least one round, e.g. ["u", "v"]')
    return value


def _refuse_fp16(value):
    if str(value).lower() in _FP16_NAMES:
        raise ValueError(
            f"`dtype` {value!r} is not supported: float16 collapsed the LoRA loss to 0 in the "
            "reference code; use 'bfloat16' or 'float32'"
        )
    return value


def _check_steps(value: int) -> int:
    if value < 1:
        raise ValueError(f"`steps` must be a positive integer, or null to use `epochs`; got {value}")
    return value


def _check_positive(value: float, info: ValidationInfo) -> float:
    if not value > 0:
        raise ValueError(f"`{info.field_name}` must be > 0; got {value}")
    return value


def _check_dropout(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1); got {value}")
    return value


def _check_seq_len(value: int) -> int:
    from svdllm_plugin.data import check_seq_len

    return check_seq_len(value, option="SequentialLoRAModifier")


def _check_eval_windows(value: int) -> int:
    if value < 0:
        raise ValueError(f"`eval_windows` must be >= 0 (0 turns held-out perplexity off); got {value}")
    return value


Rounds = Annotated[list[Round], BeforeValidator(as_list), AfterValidator(_check_order)]
Positive = Annotated[float, AfterValidator(_check_positive)]


class SequentialLoRAModifier(Modifier):
    """LoRA on the factors of SVDLinear layers, one factor per round, each round merged.

    :param targets: SVDLinear layers to fine-tune, llmcompressor matching style (class names
        or ``re:`` patterns on module names). Default: every SVDLinear.
    :param ignore: layers never fine-tuned.
    :param order: the rounds in sequence; each is ``u`` (W_u = ``svd_u``), ``v``
        (W_v = ``svd_v``) or ``uv`` (both at once, plain LoRA).
    :param r: LoRA rank of each adapter.
    :param alpha: LoRA scaling numerator; the update is (alpha / r) B A.
    :param dropout: dropout on the adapter input.
    :param lr: AdamW learning rate.
    :param steps: optimizer steps per round; when None, ``epochs`` passes over the samples.
    :param epochs: passes over the ``num_samples`` windows per round (used when steps is None).
    :param batch_size: windows per optimizer step.
    :param num_samples: training windows of ``seq_len`` tokens drawn from ``dataset``.
    :param seq_len: tokens per window (the reference code's cutoff is 256).
    :param dataset: None or "embedded" (built-in text), a local .txt/.jsonl/.json file, or a
        hub dataset name where a hub is reachable. Training uses its calibration split,
        held-out perplexity its evaluation split.
    :param tokenizer: tokenizer folder or hub id; default: the model's ``config.name_or_path``.
    :param dtype: ``float32``, or ``bfloat16`` autocast. float16 is refused: it collapsed the
        LoRA loss to 0 in the reference code.
    :param eval_windows: held-out windows for the perplexity logged before and after each
        round; 0 turns it off.
    :param seed: seeds the training windows, the LoRA initialisation, dropout and shuffling.
    """

    targets: Modules = Field(default_factory=lambda: ["SVDLinear"])
    ignore: Modules = Field(default_factory=list)
    order: Rounds = Field(default_factory=lambda: ["u", "v"])
    r: PositiveInt = 8
    alpha: Positive = 16.0
    dropout: Annotated[float, AfterValidator(_check_dropout)] = 0.05
    lr: Positive = 1e-4
    steps: Annotated[int, AfterValidator(_check_steps)] | None = None
    epochs: Positive = 1.0
    batch_size: PositiveInt = 4
    num_samples: PositiveInt = 128
    seq_len: Annotated[int, AfterValidator(_check_seq_len)] = 256
    dataset: str | None = None
    tokenizer: str | None = None
    dtype: Annotated[Literal["float32", "bfloat16"], BeforeValidator(_refuse_fp16)] = "float32"
    eval_windows: Annotated[int, AfterValidator(_check_eval_windows)] = 16
    seed: int = 0

    _layer_names: list[str] = PrivateAttr(default_factory=list)
    _samples: torch.Tensor | None = PrivateAttr(default=None)  # (num_samples, seq_len)
    _held_out: torch.Tensor | None = PrivateAttr(default=None)  # (eval_windows, seq_len)
    _records: list[dict] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_steps_or_epochs(self):
        if self.steps is None and self.steps_per_round < 1:
            raise ValueError("`epochs` x `num_samples` / `batch_size` gives 0 steps; raise `epochs`")
        return self

    @property
    def steps_per_round(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * self.num_samples / self.batch_size)

    @property
    def records(self) -> list[dict]:
        """One dict per round: factor, modules, steps, first/last loss, perplexity before/after, time."""
        return list(self._records)

    # ---- lifecycle ------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._layer_names = self._resolve_layers(state.model)
        tokenizer = self._load_tokenizer(state.model)
        self._samples, self._held_out = self._token_windows(tokenizer)
        logger.info(
            "SequentialLoRAModifier: {} SVDLinear layers, rounds {}, r={} alpha={} lr={} "
            "{} steps x batch {} of {} tokens",
            len(self._layer_names),
            self.order,
            self.r,
            self.alpha,
            self.lr,
            self.steps_per_round,
            self.batch_size,
            self.seq_len,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        later = _later_calibrating_modifiers(self)
        if later:
            raise ValueError(
                f"SequentialLoRAModifier shares one calibration pipeline with {later}, which would "
                "compress the factors before LoRA trains them; run oneshot with pipeline='independent' "
                "(the default) so each modifier gets its own turn"
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        model = state.model
        settings = self._settings(model)
        with _quantization_disabled(model):
            ppl = self._perplexity(model, "before LoRA")
            for i, factor in enumerate(self.order):
                settings.seed = self.seed + i
                result = train_round(model, self._layer_names, factor, self._samples, settings)
                after = self._perplexity(model, f"after round W_{factor}")
                self._record(i, result, ppl, after)
                ppl = after

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._samples = self._held_out = None
        return True

    # ---- work -----------------------------------------------------------------------
    def _resolve_layers(self, model: nn.Module) -> list[str]:
        if not any(isinstance(m, SVDLinear) for m in model.modules()):
            raise ValueError(
                "SequentialLoRAModifier needs factorized layers: put SVDLLMModifier before it in the "
                "recipe (or load a model that already has SVDLinear layers)"
            )
        names = [
            name
            for name, module in match_named_modules(model, self.targets, self.ignore)
            if isinstance(module, SVDLinear)
        ]
        if not names:
            raise ValueError(
                f"SequentialLoRAModifier found no SVDLinear layers matching targets={self.targets} "
                f"(ignore={self.ignore}). Please check `targets` in the recipe."
            )
        return names

    def _load_tokenizer(self, model: nn.Module):
        from transformers import AutoTokenizer

        source = self.tokenizer or getattr(getattr(model, "config", None), "name_or_path", None)
        if not source:
            raise ValueError(
                "SequentialLoRAModifier needs a tokenizer and the model has no config.name_or_path; "
                "set `tokenizer` to a tokenizer folder"
            )
        return AutoTokenizer.from_pretrained(source)

    def _token_windows(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
        from svdllm_plugin import data

        text = data.load_text(self.dataset, "calibration")
        train = data.calibration_dataset(tokenizer, text, self.num_samples, self.seq_len, seed=self.seed)
        samples = torch.tensor(train["input_ids"], dtype=torch.long)  # (num_samples, seq_len)
        held_out = None
        if self.eval_windows:
            held_text = data.load_text(self.dataset, "evaluation")
            held_out = data.eval_windows(tokenizer, held_text, self.seq_len, self.eval_windows)
        return samples, held_out

    def _settings(self, model: nn.Module) -> LoraSettings:
        if self.dtype == "float32" and next(model.parameters()).dtype == torch.float16:
            logger.warning("the model is float16: LoRA may be unstable; load it in float32 or bfloat16")
        return LoraSettings(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            lr=self.lr,
            steps=self.steps_per_round,
            batch_size=self.batch_size,
            seed=self.seed,
            autocast_dtype=torch.bfloat16 if self.dtype == "bfloat16" else None,
        )

    def _perplexity(self, model: nn.Module, when: str) -> float | None:
        if self._held_out is None:
            return None
        from svdllm_plugin.evaluate import perplexity

        was_training = model.training
        ppl = perplexity(model, self._held_out, batch_size=self.batch_size, progress=False)
        model.train(was_training)
        logger.info("SequentialLoRAModifier: held-out perplexity {} = {:.3f}", when, ppl)
        return ppl

    def _record(self, index: int, result: RoundResult, ppl_before, ppl_after) -> None:
        self._records.append(
            dict(
                round=index,
                factor=result.factor,
                modules=result.modules,
                steps=result.steps,
                first_loss=result.losses[0],
                last_loss=result.losses[-1],
                ppl_before=ppl_before,
                ppl_after=ppl_after,
                seconds=result.seconds,
            )
        )


def _later_calibrating_modifiers(modifier: Modifier) -> list[str]:
    """Names of the modifiers after ``modifier`` in the running pipeline that calibrate on data.

    The independent pipeline runs one modifier per turn, so this is empty there.
    """
    from llmcompressor.core import active_session

    recipe = active_session().lifecycle.recipe
    modifiers = list(getattr(recipe, "modifiers", None) or [])
    if modifier not in modifiers:
        return []
    after = modifiers[modifiers.index(modifier) + 1 :]
    return [type(m).__name__ for m in after if m.requires_calibration_data]


@contextlib.contextmanager
def _quantization_disabled(model: nn.Module):
    """Train and evaluate the unquantized factors.

    A later GPTQModifier attached its scheme to the factors at initialize, and the pipeline
    of an earlier modifier's turn leaves quantization enabled on exit (``DisableQuantization``
    re-enables it), so without this the forward would fake-quantize with uncalibrated scales.
    Each module's own flag is restored afterwards.
    """
    flags = {m: m.quantization_enabled for m in model.modules() if hasattr(m, "quantization_enabled")}
    try:
        for module in flags:
            module.quantization_enabled = False
        yield
    finally:
        for module, flag in flags.items():
            module.quantization_enabled = flag
