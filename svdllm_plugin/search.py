"""Byte-budget search: the stack with the lowest VALIDATION perplexity that fits a size budget.

    svdllm compress --target-bits 3.5 --output out        # bits per decoder-Linear weight
    svdllm compress --target-size 120MB --output out      # safetensors bytes (B, KB, MB, GB, KiB, ...)

A candidate is a recipe (YAML text) with what is needed to predict its size from the model's
config before running it: GPTQ bit width x group size, an SVD-LLM ratio in front of GPTQ, a QuIP
incoherence transform, a low-rank compensation of GPTQ's error. The search drops every candidate
predicted over budget, runs the others one at a time (oneshot on a fresh copy), saves each to a
temporary folder to MEASURE its size (a candidate measured over budget is rejected, whatever was
predicted), evaluates it on the validation windows, and writes the winner with the usual
``save_pretrained`` (atomic) and its recipe. Test-split perplexities are measured for the winner
only: choices never see the test windows.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from loguru import logger

from svdllm_plugin.candidates import (
    Budget,
    Candidate,
    default_candidates,
    parse_budget,
    plan,
    predict_size,
)

__all__ = ["Budget", "Candidate", "parse_budget", "default_candidates", "predict_size", "search"]


def _parse(recipe_text: str):
    from llmcompressor.recipe import Recipe

    from svdllm_plugin import register_modifiers

    register_modifiers()
    return Recipe.create_instance(recipe_text).modifiers


def search(
    model: str,
    output: str,
    budget: Budget,
    candidates: list[Candidate] | None = None,
    dataset: str | None = None,
    num_samples: int = 64,
    seq_len: int = 512,
    eval_windows: int = 40,
    overwrite: bool = False,
    device: str | None = None,
    seed: int = 0,
    save_dtype: str | None = "bf16",
):
    """Run the budget search and write the winner to ``output``: returns (CompressionReport, trials).

    Every input (the budget against every candidate's predicted size included) is checked before the
    weights load; nothing is written to ``output`` unless a candidate fits once measured.
    """
    import time

    import torch
    from transformers import AutoConfig

    from svdllm_plugin import compress as job
    from svdllm_plugin.atomic import check_output_dir
    from svdllm_plugin.checkpoint import save_pretrained
    from svdllm_plugin.checkpoint.format import CONFIG_KEY, read_config
    from svdllm_plugin.checkpoint.pretrained import check_save_dtype
    from svdllm_plugin.data import calibration_dataset, held_out_splits, load_text
    from svdllm_plugin.evaluate import perplexity
    from svdllm_plugin.layers import SVDLinear
    from svdllm_plugin.models import check_model, load_model_and_tokenizer

    start = time.perf_counter()
    check_output_dir(output, overwrite)
    job._check_counts(num_samples, seq_len, eval_windows)
    if not eval_windows:
        raise ValueError(
            "--eval-windows must be >= 1 with a budget: the search chooses on validation perplexity"
        )
    device = job.check_device(device)
    check_save_dtype(save_dtype)
    path = check_model(model)
    calib_text, eval_text = load_text(dataset, "calibration"), load_text(dataset, "evaluation")
    trials = plan(budget, candidates or default_candidates(), AutoConfig.from_pretrained(path), save_dtype)
    for t in trials:
        if t.status == "pending":
            try:
                _parse(t.candidate.recipe())
            except Exception as error:  # noqa: BLE001  (e.g. a modifier this install does not have)
                t.status = f"unavailable: {str(error).splitlines()[0][:80]}"
    runnable = [t for t in trials if t.status == "pending"]
    if not runnable:
        raise ValueError(
            f"no candidate within {budget} can run here ({trials[0].status}); give a larger budget"
        )

    base, tokenizer = load_model_and_tokenizer(path, check=False)
    calib = calibration_dataset(tokenizer, calib_text, num_samples, seq_len, seed=seed)
    held = held_out_splits(tokenizer, eval_text, seq_len, eval_windows)
    other_test = job._other_domain_windows(tokenizer, seq_len, eval_windows, "test")
    from tqdm import tqdm

    best, best_model = None, None
    with tempfile.TemporaryDirectory(prefix="svdllm-search-") as tmp:
        for i, t in enumerate(tqdm(runnable, desc=f"Budget search ({budget})", unit="candidate")):
            logger.info("Candidate {}/{}: {}", i + 1, len(runnable), t.candidate.name)
            candidate_model = copy.deepcopy(base)
            text = t.candidate.recipe()
            try:
                job.run_recipe(candidate_model, tokenizer, calib, text, _parse(text), seq_len)
                folder = save_pretrained(
                    candidate_model, Path(tmp) / f"c{i}", save_dtype=save_dtype, recipe=text
                )
            except Exception as error:  # noqa: BLE001  (one failing stack must not end the search)
                logger.warning("candidate {} failed: {}", t.candidate.name, error)
                t.status = f"failed: {str(error).splitlines()[0][:80]}"
                continue
            t.size = read_config(folder)[CONFIG_KEY]["size"]
            if not budget.fits(t.size):
                t.status = "over budget (measured)"
                continue
            t.ppl_validation = perplexity(candidate_model.to(device), held["validation"], progress=False)
            candidate_model.to("cpu")
            t.status = "ok"
            if best is None or t.ppl_validation < best.ppl_validation:
                best, best_model = t, candidate_model
    if best is None:
        raise RuntimeError(
            f"no candidate fits {budget} once written (see the table above); give a larger budget"
        )
    best.status = "chosen"
    report = job.CompressionReport(model=model, output=str(output), eval_split="test", save_dtype=save_dtype)
    report.ppl_before = perplexity(base.to(device), held["test"], desc="Perplexity before (test)")
    report.ppl_after = perplexity(best_model.to(device), held["test"], desc="Perplexity after (test)")
    if other_test is not None:
        report.ppl_other_before = perplexity(base, other_test, progress=False)
        report.ppl_other_after = perplexity(best_model, other_test, progress=False)
    best_model.to("cpu")
    report.params_model_before = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    counts = job.parameter_counts(best_model)
    report.params_targeted_before, report.params_targeted_after, report.params_model_after = counts
    report.modules = sum(isinstance(m, SVDLinear) for m in best_model.modules())
    del base
    torch.manual_seed(seed)
    save_pretrained(
        best_model,
        output,
        tokenizer,
        overwrite=overwrite,
        extra={
            **report.record(),
            "budget": str(budget),
            "search": [
                dict(zip(["candidate", "predicted_bits", "bits", "MB", "ppl_validation", "status"], t.row()))
                for t in trials
            ],
        },
        recipe=best.candidate.recipe(),
        base_model=model,
        save_dtype=save_dtype,
    )
    report.size = read_config(output)[CONFIG_KEY]["size"]
    if not budget.fits(report.size):  # the same save as measured above; a guard, not a branch taken
        raise RuntimeError(
            f"the winner was written over budget ({report.size}); this is a bug, please report it"
        )
    report.seconds, report.peak_memory_gib = time.perf_counter() - start, job.peak_memory_gib()
    return report, trials
