"""One compression job: load, calibrate through llmcompressor's oneshot, measure, save.

The CLI is a thin argument parser over ``compress`` and ``evaluate_model``; Python users
call these directly, or call ``llmcompressor.oneshot`` themselves with our modifiers.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from svdllm_plugin.atomic import check_output_dir
from svdllm_plugin.checkpoint import save_pretrained
from svdllm_plugin.checkpoint.pretrained import check_save_dtype
from svdllm_plugin.layers import SVDLinear

__all__ = [
    "CompressionReport",
    "load_recipe",
    "compress",
    "parameter_counts",
    "default_device",
    "check_device",
]

DEFAULT_RECIPE = """\
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.2
"""


OTHER_DOMAIN = "license prose"  # svdllm_plugin.data.other_domain_text


@dataclass
class CompressionReport:
    model: str
    output: str
    params_targeted_before: int = 0
    params_targeted_after: int = 0
    params_model_before: int = 0
    params_model_after: int = 0
    ppl_before: float | None = None
    ppl_after: float | None = None
    ppl_other_before: float | None = None  # another domain than the calibration text (license prose)
    ppl_other_after: float | None = None
    seconds: float = 0.0
    peak_memory_gib: float = 0.0
    modules: int = 0
    eval_split: str = "test"  # which held-out split the perplexities are of (svdllm_plugin.data)
    size: dict = field(default_factory=dict)  # svdllm_plugin.checkpoint.bits.checkpoint_bits of the output
    save_dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What the checkpoint's ``svdllm`` record keeps of this run (its perplexities and split)."""
        keys = ("ppl_before", "ppl_after", "ppl_other_before", "ppl_other_after", "eval_split")
        return {key: getattr(self, key) for key in keys}

    def table(self) -> str:
        def reduction(before, after):
            return f"{1 - after / before:.1%} removed" if before else "-"

        def ppl(value):
            return "-" if value is None else f"{value:.3f}"

        rows = [
            ("model", self.model, "", ""),
            ("factorized modules", str(self.modules), "", ""),
            (
                "params (targeted)",
                f"{self.params_targeted_before:,}",
                f"{self.params_targeted_after:,}",
                reduction(self.params_targeted_before, self.params_targeted_after),
            ),
            (
                "params (whole model)",
                f"{self.params_model_before:,}",
                f"{self.params_model_after:,}",
                reduction(self.params_model_before, self.params_model_after),
            ),
            ("held-out perplexity", ppl(self.ppl_before), ppl(self.ppl_after), f"{self.eval_split} split"),
            (
                "other-domain perplexity",
                ppl(self.ppl_other_before),
                ppl(self.ppl_other_after),
                f"{OTHER_DOMAIN}, {self.eval_split} split",
            ),
            *self._size_rows(),
            ("time", f"{self.seconds:.1f} s", "", ""),
            ("peak memory", f"{self.peak_memory_gib:.2f} GiB", "", ""),
            ("output", self.output, "", ""),
        ]
        header = ("", "before", "after", "")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def _size_rows(self) -> list[tuple[str, str, str, str]]:
        if not self.size:
            return []
        dtype = f"float tensors in {self.save_dtype}" if self.save_dtype else "float tensors as in memory"
        return [
            ("safetensors bytes", "", f"{self.size['safetensors_bytes']:,}", dtype),
            (
                "bits per decoder-Linear weight",
                "",
                f"{self.size['decoder_linear_bits']:.3f}",
                "everything under each Linear",
            ),
        ]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """``device`` (default: cuda if available), refused now if this machine does not have it."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device ({error}); use cpu, cuda or cuda:N") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(
                f"--device {device!r}: this machine has {count} CUDA devices; use --device cpu or omit it"
            )
    elif parsed.type != "cpu" and not (
        torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == parsed.type
    ):
        raise ValueError(f"--device {device!r} is not available here; use --device cpu or leave it out")
    return device


def peak_memory_gib() -> float:
    """Peak resident memory of this process (and of the GPU, where one is used)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**30)
    return rss


def load_recipe(recipe: str | None):
    """A recipe path (checked now, before any model is loaded) or the default recipe text.

    Parsing it here instantiates every modifier, so a typo or a bad setting fails at
    once with pydantic's message instead of after the model has loaded.
    """
    if recipe is None:
        text = DEFAULT_RECIPE
    else:
        path = Path(recipe).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"recipe file {recipe} {what}; pass a YAML recipe path")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"recipe file {recipe} is not UTF-8 text ({error}); pass a YAML file") from error
    from svdllm_plugin.recipe_checks import check_order, parse_recipe

    parse_recipe(text, recipe or "(default)")  # keys llmcompressor would drop, duplicates
    from llmcompressor.recipe import Recipe

    from svdllm_plugin import register_modifiers

    register_modifiers()
    modifiers = Recipe.create_instance(text).modifiers  # oneshot builds its own instances
    if not modifiers:
        raise ValueError(
            f"recipe {recipe or '(default)'} defines no modifiers: nest them as "
            "`<name>_stage: {<name>_modifiers: {SVDLLMModifier: {...}}}` (llmcompressor ignores other keys)"
        )
    check_order(modifiers)
    return text, modifiers


def single_pass(modifiers) -> bool:
    """True when every modifier only needs the original model's activations.

    Then the sequential pipeline's second (error-propagation) pass per layer is wasted work:
    layers stay dense until calibration ends, so it would recompute the same outputs.
    """
    from svdllm_plugin.modifiers.svd import SVDLLMModifier

    return all(isinstance(m, SVDLLMModifier) and not m.propagates for m in modifiers)


def pipeline_for(modifiers) -> str:
    """``sequential`` when a compensation step shares its pass with the quantizer (then it holds
    one decoder layer's original weights at a time), else oneshot's default ``independent``
    (every modifier in a pass of its own: what SVD and LoRA steps need)."""
    from svdllm_plugin.modifiers.compensation import LowRankCompensationModifier
    from svdllm_plugin.modifiers.lora import SequentialLoRAModifier
    from svdllm_plugin.modifiers.svd import SVDLLMModifier

    if any(isinstance(m, (SVDLLMModifier, SequentialLoRAModifier)) for m in modifiers):
        return "independent"
    compensates = any(isinstance(m, LowRankCompensationModifier) for m in modifiers)
    return "sequential" if compensates else "independent"


def pass_settings(modifiers) -> dict:
    """oneshot's ``propagate_error`` and ``pipeline`` for these modifiers: the one place that decides
    how a recipe runs (``svdllm compress``, the budget search and the benchmarks all call it)."""
    return dict(propagate_error=not single_pass(modifiers), pipeline=pipeline_for(modifiers))


def run_recipe(model, tokenizer, calib, recipe_text: str, modifiers, seq_len: int) -> None:
    """llmcompressor's oneshot of ``recipe_text`` on ``model`` in place, calibrated on ``calib``."""
    from llmcompressor import oneshot

    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calib,
        recipe=recipe_text,
        num_calibration_samples=len(calib),
        max_seq_length=seq_len,
        **pass_settings(modifiers),
    )


def parameter_counts(model) -> tuple[int, int, int]:
    """(targeted dense params, targeted factor params, whole-model params)."""
    from svdllm_plugin.modifiers.svd.decompose import params_of

    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    before = sum(m.in_features * m.out_features for m in layers)
    after = sum(params_of(m.out_features, m.in_features, m.rank) for m in layers)
    whole = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return before, after, whole


def _check_counts(num_samples: int, seq_len: int, eval_windows: int | None) -> None:
    from svdllm_plugin.data import check_seq_len

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--num-samples must be an integer >= 1; got {num_samples!r}")
    check_seq_len(seq_len)
    if eval_windows is not None and (not isinstance(eval_windows, int) or eval_windows < 0):
        raise ValueError(f"--eval-windows must be an integer >= 0 (0: skip); got {eval_windows!r}")


def compress(
    model: str,
    output: str,
    recipe: str | None = None,
    dataset: str | None = None,
    num_samples: int = 64,
    seq_len: int = 512,
    eval_windows: int | None = 40,
    overwrite: bool = False,
    device: str | None = None,
    seed: int = 0,
    save_dtype: str | None = "bf16",
    eval_split: str = "test",
) -> CompressionReport:
    """Compress ``model`` with ``recipe`` on ``dataset`` and save it to ``output``.

    Every input is checked before the slow work starts; the output folder appears only
    when everything succeeded. Perplexities are of the ``eval_split`` ("test" or "validation")
    half of the held-out windows (:func:`svdllm_plugin.data.held_out_splits`); ``save_dtype``
    (bf16, fp16, fp32, None: as in memory) is how the float tensors are written.
    """
    from svdllm_plugin.data import calibration_dataset, held_out_splits, load_text
    from svdllm_plugin.evaluate import perplexity
    from svdllm_plugin.models import check_model, check_seq_len, load_model_and_tokenizer
    from svdllm_plugin.recipe_checks import check_against_model, check_applied, model_snapshot

    start = time.perf_counter()
    # pre-flight: every cheap check runs before the weights load and calibration starts
    # (the recipe last: parsing it imports llmcompressor, the slowest of these)
    check_output_dir(output, overwrite, inputs=_inputs(model=model, dataset=dataset, recipe=recipe))
    _check_counts(num_samples, seq_len, eval_windows)
    device = check_device(device)
    check_save_dtype(save_dtype)
    _check_split(eval_split)
    path = check_model(model)
    calib_text, eval_text = load_text(dataset, "calibration"), load_text(dataset, "evaluation")
    check_seq_len(path, seq_len)
    recipe_text, modifiers = load_recipe(recipe)

    from svdllm_plugin import distributed

    distributed.init_process_group()  # under torchrun: one process per device
    model_obj, tokenizer = load_model_and_tokenizer(path, check=False)
    calib = calibration_dataset(tokenizer, calib_text, num_samples, seq_len, seed=seed)
    calib = distributed.rank_partition(calib)  # this rank's share under torchrun
    windows = other = None
    if eval_windows:
        windows = held_out_splits(tokenizer, eval_text, seq_len, eval_windows)[eval_split]
        other = _other_domain_windows(tokenizer, seq_len, eval_windows, eval_split)
    report = CompressionReport(model=model, output=str(output), eval_split=eval_split, save_dtype=save_dtype)
    report.params_model_before = sum(p.numel() for p in {id(p): p for p in model_obj.parameters()}.values())

    if windows is not None:
        report.ppl_before = perplexity(model_obj.to(device), windows, desc="Perplexity before")
    if other is not None:
        report.ppl_other_before = perplexity(model_obj, other, desc="Other-domain perplexity before")
    model_obj.to("cpu")
    check_against_model(modifiers, model_obj)  # patterns that match nothing, before calibration
    snapshot = model_snapshot(model_obj)
    logger.info("Calibrating on {} samples x {} tokens", num_samples, seq_len)
    run_recipe(model_obj, tokenizer, calib, recipe_text, modifiers, seq_len)
    check_applied(modifiers, model_obj, snapshot)  # a modifier that did nothing: refuse to save
    if windows is not None:
        report.ppl_after = perplexity(model_obj.to(device), windows, desc="Perplexity after")
    if other is not None:
        report.ppl_other_after = perplexity(model_obj, other, desc="Other-domain perplexity after")
    model_obj.to("cpu")
    report.params_targeted_before, report.params_targeted_after, report.params_model_after = parameter_counts(
        model_obj
    )
    report.modules = sum(isinstance(m, SVDLinear) for m in model_obj.modules())
    distributed.save_on_source(  # rank 0 writes; the others take part in llmcompressor's barriers
        save_pretrained,
        model_obj,
        output,
        tokenizer,
        overwrite=overwrite,
        extra=report.record(),
        recipe=recipe_text,
        base_model=model,
        save_dtype=save_dtype,
    )
    if (Path(output) / "config.json").is_file():  # every rank but the writer of a torchrun job: absent
        from svdllm_plugin.checkpoint.format import CONFIG_KEY, read_config

        report.size = read_config(output)[CONFIG_KEY].get("size") or {}
    report.seconds = time.perf_counter() - start
    report.peak_memory_gib = peak_memory_gib()
    return report


def _inputs(**paths: str | None) -> list[tuple[str, str]]:
    """The run's input files and folders that exist, which ``--overwrite`` must never delete."""
    return [(what, p) for what, p in paths.items() if p and Path(p).expanduser().exists()]


def _check_split(split: str) -> None:
    from svdllm_plugin.data import HELD_OUT_SPLITS

    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"--eval-split must be one of {', '.join(HELD_OUT_SPLITS)}; got {split!r}")


def _other_domain_windows(tokenizer, seq_len: int, count: int, split: str = "test"):
    """The ``split`` windows of another domain than the calibration text (the installed packages'
    license prose), to show calibration over-fitting; None, with a log line, where there is none."""
    from svdllm_plugin.data import other_domain_text, spread_splits

    try:
        return spread_splits(tokenizer, other_domain_text(), seq_len, count)[split]
    except (FileNotFoundError, ValueError) as error:
        logger.warning("no other-domain perplexity: {}", error)
        return None
