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
from svdllm_plugin.layers import SVDLinear

__all__ = ["CompressionReport", "load_recipe", "compress", "parameter_counts", "default_device"]

DEFAULT_RECIPE = """\
svd_stage:
  svd_modifiers:
    SVDLLMModifier:
      ratio: 0.2
"""


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
    seconds: float = 0.0
    peak_memory_gib: float = 0.0
    modules: int = 0
    extra: dict = field(default_factory=dict)

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
            ("held-out perplexity", ppl(self.ppl_before), ppl(self.ppl_after), ""),
            ("time", f"{self.seconds:.1f} s", "", ""),
            ("peak memory", f"{self.peak_memory_gib:.2f} GiB", "", ""),
            ("output", self.output, "", ""),
        ]
        header = ("", "before", "after", "")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from llmcompressor.recipe import Recipe

    import svdllm_plugin  # noqa: F401  (registers our modifiers with the factory)

    if recipe is None:
        text = DEFAULT_RECIPE
    else:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {recipe} does not exist; pass a YAML recipe path")
        text = path.read_text()
    modifiers = Recipe.create_instance(text).modifiers  # oneshot builds its own instances
    if not modifiers:
        raise ValueError(
            f"recipe {recipe or '(default)'} defines no modifiers: nest them as "
            "`<name>_stage: {<name>_modifiers: {SVDLLMModifier: {...}}}` (llmcompressor ignores other keys)"
        )
    return text, modifiers


def single_pass(modifiers) -> bool:
    """True when every modifier only needs the original model's activations.

    Then the sequential pipeline's second (error-propagation) pass per layer is wasted work:
    layers stay dense until calibration ends, so it would recompute the same outputs.
    """
    from svdllm_plugin.modifiers.svd import SVDLLMModifier

    return all(
        isinstance(m, SVDLLMModifier) and m.activations == "original" and not m.closed_form_update
        for m in modifiers
    )


def parameter_counts(model) -> tuple[int, int, int]:
    """(targeted dense params, targeted factor params, whole-model params)."""
    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    before = sum(m.in_features * m.out_features for m in layers)
    after = sum(m.rank * (m.in_features + m.out_features) for m in layers)
    whole = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return before, after, whole


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
) -> CompressionReport:
    """Compress ``model`` with ``recipe`` on ``dataset`` and save it to ``output``.

    Every input is checked before the slow work starts; the output folder appears only
    when everything succeeded.
    """
    from llmcompressor import oneshot

    from svdllm_plugin.data import calibration_dataset, load_text
    from svdllm_plugin.data import eval_windows as make_windows
    from svdllm_plugin.evaluate import perplexity
    from svdllm_plugin.models import load_model_and_tokenizer, resolve_model_path
    from svdllm_plugin.modifiers.svd import distributed

    start = time.perf_counter()
    distributed.init_process_group()  # under torchrun: one process per device
    check_output_dir(output, overwrite)
    recipe_text, modifiers = load_recipe(recipe)
    path = resolve_model_path(model)
    calib_text, eval_text = load_text(dataset, "calibration"), load_text(dataset, "evaluation")

    model_obj, tokenizer = load_model_and_tokenizer(path)
    calib = calibration_dataset(tokenizer, calib_text, num_samples, seq_len, seed=seed)
    calib = distributed.rank_partition(calib)  # this rank's share under torchrun
    windows = make_windows(tokenizer, eval_text, seq_len, eval_windows) if eval_windows else None
    report = CompressionReport(model=model, output=str(output))
    report.params_model_before = sum(p.numel() for p in {id(p): p for p in model_obj.parameters()}.values())

    device = device or default_device()
    if windows is not None:
        report.ppl_before = perplexity(model_obj.to(device), windows, desc="Perplexity before")
    model_obj.to("cpu")
    logger.info("Calibrating on {} samples x {} tokens", num_samples, seq_len)
    oneshot(
        model=model_obj,
        processor=tokenizer,
        dataset=calib,
        recipe=recipe_text,
        num_calibration_samples=len(calib),
        max_seq_length=seq_len,
        propagate_error=not single_pass(modifiers),
    )
    if windows is not None:
        report.ppl_after = perplexity(model_obj.to(device), windows, desc="Perplexity after")
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
        extra={"ppl_before": report.ppl_before, "ppl_after": report.ppl_after},
    )
    report.seconds = time.perf_counter() - start
    report.peak_memory_gib = peak_memory_gib()
    return report
