"""LoRA on the factors of SVDLinear layers: inject, train, merge. Plain functions, no llmcompressor.

One *round* trains LoRA adapters on one factor (W_u = ``svd_u`` or W_v = ``svd_v``, or both
for plain simultaneous LoRA) of the chosen SVDLinear layers, with everything else frozen,
then merges them: W_u <- W_u + (alpha / r) B A. The factor Linears keep their identity and
shape (m, k) / (k, n), so the rank k is unchanged and any modifier that already bound them
(GPTQ) still refers to the right modules.

peft is imported lazily: it is the optional ``lora`` extra.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from svdllm_plugin.layers import SVDLinear, replace_module
from svdllm_plugin.offload import write_parameter

__all__ = ["FACTORS", "LoraSettings", "RoundResult", "factor_names", "inject", "unload", "train_round"]

# a round's name -> the SVDLinear children it trains
FACTORS = {"u": ("svd_u",), "v": ("svd_v",), "uv": ("svd_u", "svd_v")}
_ADAPTER = "svdllm_lora"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 4
    autocast_dtype: torch.dtype | None = None  # bfloat16 autocast, or None for the model's dtype
    seed: int = 0


@dataclass
class RoundResult:
    factor: str
    modules: int
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def factor_names(layer_names: list[str], factor: str) -> list[str]:
    """Full names of the factor Linears a round trains, e.g. ``model.layers.0.mlp.up_proj.svd_u``."""
    return [f"{name}.{child}" for name in layer_names for child in FACTORS[factor]]


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "SequentialLoRAModifier needs peft: `pip install 'svdllm-plugin[lora]'` (peft==0.21.2)"
        ) from e
    return peft


def _check_factorized(model: nn.Module, layer_names: list[str]) -> None:
    for name in layer_names:
        layer = model.get_submodule(name)
        if not isinstance(layer, SVDLinear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not an SVDLinear; check `targets`")
        if layer.pending:
            raise ValueError(
                f"{name} has no factors yet (pending SVDLinear): SequentialLoRAModifier must run after "
                "SVDLLMModifier has finished; use oneshot's default pipeline='independent'"
            )


def inject(model: nn.Module, targets: list[str], settings: LoraSettings) -> list[nn.Parameter]:
    """Wrap each named factor Linear with a LoRA adapter (in place); return the LoRA parameters."""
    peft = _import_peft()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,  # full names: peft matches a name exactly or as a ".suffix"
        bias="none",
    )
    peft.inject_adapter_in_model(config, model, adapter_name=_ADAPTER)  # no PeftModel wrapper
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    wrapped = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    if wrapped != len(targets):
        raise RuntimeError(f"peft wrapped {wrapped} modules, expected {len(targets)}: {targets[:3]}...")
    return params


def unload(model: nn.Module, merge: bool = True) -> int:
    """Put every wrapped base Linear back, folding its LoRA adapter in if ``merge``; return the count."""
    peft = _import_peft()
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for name, module in wrapped:
        if merge:
            _merge(name, module)
        replace_module(model, name, module.get_base_layer())  # the original object, same identity
    if hasattr(model, "peft_config"):  # inject_adapter_in_model leaves its config on the model
        del model.peft_config
    return len(wrapped)


@torch.no_grad()
def _merge(name: str, module: nn.Module) -> None:
    """W <- W + (alpha / r) B A, written through the offloading API.

    peft's own ``merge`` assigns ``weight.data``: on an offloaded model that changes only a
    temporary onloaded copy, and the merge is lost.
    """
    base = module.get_base_layer()
    W = base.weight.detach()  # (out, in), onloaded
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            W = W + module.get_delta_weight(adapter).to(W.dtype)
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: the LoRA-merged weight has NaN/inf values; lower `lr` or use float32")
    write_parameter(base, "weight", W)


@contextlib.contextmanager
def _restored_flags(model: nn.Module):
    """Restore every parameter's requires_grad and the train/eval mode on exit (peft changes both)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()


def _batches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches: shuffled epochs, as many as needed."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(num_samples, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _loss(model: nn.Module, input_ids: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    device_type = input_ids.device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def train_loop(
    model: nn.Module, params: list[nn.Parameter], samples: torch.Tensor, settings: LoraSettings, desc: str
) -> list[float]:
    """AdamW on ``params`` over ``samples`` (N, seq_len) with the causal LM loss; the loss per step."""
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(
        _batches(samples.shape[0], settings.batch_size, settings.steps, generator),
        total=settings.steps,
        desc=desc,
    )
    _train_only(model, params)
    with torch.enable_grad():  # calibration contexts may have turned grad off
        for idx in bar:
            loss = _loss(model, samples[idx].to(device), settings.autocast_dtype)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"LoRA loss became {loss.item()} at step {len(losses)}; lower `lr` or use dtype float32"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def train_round(
    model: nn.Module, layer_names: list[str], factor: str, samples: torch.Tensor, settings: LoraSettings
) -> RoundResult:
    """One round: LoRA on ``factor`` ("u", "v" or "uv") of the SVDLinears ``layer_names``, merged."""
    if settings.steps < 1:
        raise ValueError(f"a LoRA round needs at least one step; got steps={settings.steps}")
    _check_factorized(model, layer_names)
    targets = factor_names(layer_names, factor)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _restored_flags(model):  # LoRA init, dropout: global RNG
        torch.manual_seed(settings.seed)
        params = inject(model, targets, settings)
        try:
            losses = train_loop(model, params, samples, settings, desc=f"LoRA on W_{factor}")
        except BaseException:
            unload(model, merge=False)  # never leave peft wrappers behind, nor a half-trained update
            raise
        unload(model, merge=True)
    result = RoundResult(factor, len(targets), settings.steps, losses, time.perf_counter() - start)
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10) :]
    logger.info(
        "LoRA round W_{}: {} factors, {} steps, loss {:.4f} -> {:.4f} (first/last 10%), {:.1f}s",
        factor,
        len(targets),
        len(losses),
        _mean(head),
        _mean(tail),
        result.seconds,
    )
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
