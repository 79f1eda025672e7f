"""The candidates of the byte-budget search (:mod:`svdllm_plugin.search`): budgets, stacks as recipes,
and their sizes predicted from the model's config before anything runs.

A budget is bits per decoder-Linear weight or safetensors bytes (:mod:`svdllm_plugin.checkpoint.bits`
measures both on a written folder). A candidate's predicted size follows compressed-tensors'
pack-quantized layout: ceil(in x bits / 32) int32 words per row, one scale per group in the save
dtype (symmetric: no zero point), an int64 weight_shape; SVD factors at the ratio's rank rounded to
the group size; compensation factors r (m + n) in the save dtype; one random-Hadamard matrix per
input width for QuIP. Predictions only decide what is skipped; sizes that count are measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = [
    "Budget",
    "Candidate",
    "Trial",
    "parse_budget",
    "default_candidates",
    "predict_size",
    "plan",
    "table",
]

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SAVE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Budget:
    """At most ``bits`` per decoder-Linear weight, or at most ``bytes`` of safetensors files."""

    bits: float | None = None
    bytes: int | None = None

    def fits(self, size: dict) -> bool:
        if self.bits is not None:
            return size["decoder_linear_bits"] <= self.bits
        return size["safetensors_bytes"] <= self.bytes

    def __str__(self) -> str:
        if self.bits is not None:
            return f"{self.bits:g} bits per decoder-Linear weight"
        return f"{self.bytes / 1e6:.3f} MB of safetensors"


def parse_budget(target_bits=None, target_size=None) -> Budget:
    """One of ``--target-bits`` (a number > 0) or ``--target-size`` (``150``, ``150MB``, ``0.2GB``,
    ``90MiB``; MB when no unit), checked before any work."""
    if (target_bits is None) == (target_size is None):
        raise ValueError("give one budget: --target-bits B or --target-size MB (not both, not neither)")
    if target_bits is not None:
        try:
            bits = float(target_bits)
        except (TypeError, ValueError):
            bits = math.nan
        if not math.isfinite(bits) or bits <= 0:
            raise ValueError(
                f"--target-bits must be a number > 0 (bits per weight, e.g. 3.5); got {target_bits!r}"
            )
        return Budget(bits=bits)
    match = _SIZE.match(str(target_size))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in {"", *_UNITS}:
        raise ValueError(
            f"--target-size must be a size > 0 like 120, 120MB, 0.12GB or 115MiB; got {target_size!r}"
        )
    size = float(match.group(1)) * _UNITS[unit or "mb"]
    if size < 1:
        raise ValueError(f"--target-size must be > 0 bytes; got {target_size!r}")
    return Budget(bytes=int(size))


@dataclass(frozen=True)
class Candidate:
    """One stack: GPTQ W``bits`` group ``group_size`` on every decoder Linear (on the factors after an
    SVD-LLM step at ``ratio``), optionally behind a QuIP transform and with a rank ``comp_rank``
    compensation of the quantization error (bf16 factors). ``recipe`` overrides the YAML built here."""

    bits: int
    group_size: int = 64
    ratio: float = 0.0
    transform: bool = False
    comp_rank: int = 0
    recipe_text: str | None = None
    extra_bits: float = 0.0  # added to the prediction (what the formula cannot see)
    svd_best: bool = False  # the best whitening configuration measured: Fisher rows + update + intra_layer

    @property
    def name(self) -> str:
        parts = [f"SVD {self.ratio:g}{' best' if self.svd_best else ''}"] if self.ratio else []
        parts += ["QuIP"] if self.transform else []
        parts.append(f"GPTQ W{self.bits} g{self.group_size}")
        parts += [f"comp r{self.comp_rank}"] if self.comp_rank else []
        return " + ".join(parts)

    def recipe(self) -> str:
        if self.recipe_text is not None:
            return self.recipe_text
        lines = ["stack_stage:", "  stack_modifiers:"]
        if self.transform:
            lines += [
                "    QuIPModifier:",
                '      rotations: ["v"]',
                "      transform_type: random-hadamard",
                '      ignore: ["re:.*lm_head"]',
            ]
        if self.ratio:
            lines += [
                "    SVDLLMModifier:",
                f"      ratio: {self.ratio}",
                f"      rank_multiple: {self.group_size}",
                '      ignore: ["re:.*lm_head"]',
            ]
            if self.svd_best:
                lines += ["      row_weighting: fisher", "      fisher_batches: 16", "      update: input"]
                lines += ["      intra_layer: true"]
        lines += [
            "    GPTQModifier:",
            '      ignore: ["re:.*lm_head"]',
            "      config_groups:",
            "        group_0:",
            '          targets: ["Linear"]',
            "          weights: {num_bits: %d, type: int, symmetric: true, strategy: group, group_size: %d}"
            % (self.bits, self.group_size),
        ]
        if self.comp_rank:
            lines += [
                "    LowRankCompensationModifier:",
                '      {targets: ["Linear"], ignore: ["re:.*lm_head"], rank: %d, rank_multiple: 8, '
                "factor_bits: null, rounds: 1}" % self.comp_rank,
            ]
        return "\n".join(lines) + "\n"


def default_candidates() -> list[Candidate]:
    """The grid `svdllm compress --target-...` searches (group sizes that do not divide a model's
    Linear widths are dropped per model; compensation needs LowRankCompensationModifier)."""
    grid = [Candidate(b, g) for b in (8, 4, 3, 2) for g in (64, 32)]
    grid += [Candidate(b, 64, transform=True) for b in (4, 3, 2)]
    grid += [Candidate(4, 64, ratio=r) for r in (0.1, 0.2)] + [Candidate(3, 64, ratio=0.2)]
    grid += [Candidate(b, 64, comp_rank=r) for b, r in ((3, 32), (2, 32), (2, 64))]
    return grid


def _packed_bytes(rows: int, cols: int, bits: int, group: int, save_bytes: int) -> int:
    """compressed-tensors pack-quantized: ceil(cols x bits / 32) int32 per row, one scale per group
    (symmetric: no zero point), the int64 weight_shape."""
    return rows * math.ceil(cols * bits / 32) * 4 + rows * math.ceil(cols / group) * save_bytes + 16


def predict_size(
    candidate: Candidate, shapes: dict[str, tuple[int, int]], other_bytes: int, save_dtype="bf16"
):
    """{"decoder_linear_bits", "safetensors_bytes"} predicted for ``candidate`` on Linears of ``shapes``
    ({name: (out, in)}); ``other_bytes``: everything outside them (embeddings, norms) as saved."""
    save_bytes = _SAVE_BYTES[save_dtype or "fp32"]
    total = 0
    for m, n in shapes.values():
        if candidate.ratio:
            k = max(1, int(m * n * (1 - candidate.ratio) / (m + n)))
            k = max(candidate.group_size, round(k / candidate.group_size) * candidate.group_size)
            total += _packed_bytes(k, n, candidate.bits, candidate.group_size, save_bytes)  # svd_v
            total += _packed_bytes(m, k, candidate.bits, candidate.group_size, save_bytes)  # svd_u
        else:
            total += _packed_bytes(m, n, candidate.bits, candidate.group_size, save_bytes)
        total += candidate.comp_rank * (m + n) * save_bytes
    weights = sum(m * n for m, n in shapes.values())
    bits = 8 * total / weights + candidate.extra_bits
    return {"decoder_linear_bits": bits, "safetensors_bytes": int(other_bytes + bits * weights / 8)}


def _shapes_and_other(config, save_dtype) -> tuple[dict[str, tuple[int, int]], int]:
    """Decoder Linear shapes and the bytes of every other tensor, from the config (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from svdllm_plugin.checkpoint.bits import decoder_linears

    names = decoder_linears(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    params = {id(p): p for name, p in model.named_parameters() if name.rpartition(".")[0] not in names}
    other = sum(p.numel() for p in params.values()) * _SAVE_BYTES[save_dtype or "fp32"]
    return shapes, other


@dataclass
class Trial:
    candidate: Candidate
    predicted: dict
    status: str = "pending"  # skipped: over budget (predicted) | unavailable | over budget (measured) | ok
    size: dict = field(default_factory=dict)
    ppl_validation: float | None = None
    seconds: float = 0.0

    def row(self) -> list[str]:
        measured = self.size.get("decoder_linear_bits")
        mb = self.size.get("safetensors_bytes")
        return [
            self.candidate.name,
            f"{self.predicted['decoder_linear_bits']:.3f}",
            "-" if measured is None else f"{measured:.3f}",
            "-" if mb is None else f"{mb / 1e6:.2f}",
            "-" if self.ppl_validation is None else f"{self.ppl_validation:.3f}",
            self.status,
        ]


def table(trials: list[Trial]) -> str:
    header = ["candidate", "predicted bits", "bits", "MB", "validation ppl", "status"]
    rows = [header] + [t.row() for t in trials]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fits_groups(candidate: Candidate, shapes) -> bool:
    return all(n % candidate.group_size == 0 for _, n in shapes.values())


def plan(budget: Budget, candidates, config, save_dtype="bf16") -> list[Trial]:
    """Predict every candidate's size; refuse a budget no candidate fits (before any model loads)."""
    shapes, other = _shapes_and_other(config, save_dtype)
    trials = [
        Trial(c, predict_size(c, shapes, other, save_dtype)) for c in candidates if _fits_groups(c, shapes)
    ]
    for t in trials:
        if not budget.fits(t.predicted):
            t.status = "skipped: predicted over budget"
    if all(t.status != "pending" for t in trials):
        key = "decoder_linear_bits" if budget.bits is not None else "safetensors_bytes"
        smallest = min(trials, key=lambda t: t.predicted[key]) if trials else None
        what = (
            f"the smallest candidate ({smallest.candidate.name}) needs "
            + (
                f"{smallest.predicted[key]:.3f} bits"
                if budget.bits is not None
                else f"{smallest.predicted[key] / 1e6:.2f} MB"
            )
            if smallest
            else "no candidate fits the model's Linear widths"
        )
        raise ValueError(f"budget {budget} is too small for any candidate: {what}; give a larger budget")
    return trials
