"""Recipe checks: every key of a recipe is accounted for, every pattern matches, every modifier acts.

llmcompressor's recipe parser (``llmcompressor.recipe.Recipe.from_dict``) reads only top-level
keys ending in ``_stage`` whose value is a mapping, and in them only keys ending in
``_modifiers``; anything else is dropped without a word, and YAML itself keeps only the last of
two equal keys. So a typo (``quant_stag:``) silently removes a whole stage. These checks run in
three places of ``svdllm compress``:

- ``parse_recipe``: on the YAML text, before any model is loaded (structure, duplicate keys);
- ``check_against_model``: on the loaded model, before calibration (``targets`` / ``overrides``
  patterns that match nothing, quantization or pruning placed before the SVD modifier whose
  Linears it would change);
- ``check_applied``: after oneshot, before saving (a modifier that changed nothing).
"""

from __future__ import annotations

import yaml
from loguru import logger
from torch import nn

__all__ = ["parse_recipe", "check_order", "check_against_model", "model_snapshot", "check_applied"]

NEST = "`<name>_stage: {<name>_modifiers: {SVDLLMModifier: {...}}}`"
_TOP_LEVEL_EXTRA = ("args",)  # read by llmcompressor's Recipe besides the stages


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep only the last)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(
                f"line {key_node.start_mark.line + 1}: `{key}` appears twice in the same mapping (first on "
                f"line {seen[key]}); YAML keeps only the last, so one would be dropped: merge them, or put "
                "a second modifier of the same kind in its own group (e.g. `more_modifiers:`)"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_recipe(text: str, source: str) -> dict:
    """The recipe as a dict, refused (one line naming the key and the fix) where llmcompressor
    would drop or misread part of it."""
    try:
        obj = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or error
        raise ValueError(f"recipe file {source}{line}: not valid YAML ({problem}); fix the YAML") from error
    except ValueError as error:
        raise ValueError(f"recipe file {source}, {error}") from error
    if obj is None:
        raise ValueError(f"recipe file {source} is empty; write the modifiers as {NEST}")
    if not isinstance(obj, dict):
        raise ValueError(
            f"recipe file {source} holds a YAML {type(obj).__name__}, not a mapping of stages; "
            f"write the modifiers as {NEST}"
        )
    for stage, groups in obj.items():
        _check_stage(str(stage), groups, source)
    return obj


def _check_stage(stage: str, groups, source: str) -> None:
    if stage in _TOP_LEVEL_EXTRA:
        return
    if not stage.endswith("_stage"):
        raise ValueError(
            f"recipe {source}: top-level key `{stage}` is not a stage (llmcompressor reads only keys "
            f"ending in `_stage`) and would be ignored with all it holds; rename it, e.g. "
            f"`{_suggest(stage, '_stage')}`, or remove it"
        )
    if not isinstance(groups, dict) or not groups:
        raise ValueError(
            f"recipe {source}: `{stage}` must be a mapping of `<name>_modifiers` groups; got "
            f"{type(groups).__name__ if groups is not None else 'nothing'}; write the modifiers as {NEST}"
        )
    for group, modifiers in groups.items():
        where = f"{stage}.{group}"
        if not str(group).endswith("_modifiers"):
            raise ValueError(
                f"recipe {source}: `{where}` is not a modifier group (llmcompressor reads only keys "
                f"ending in `_modifiers`) and would be ignored; rename it, e.g. "
                f"`{_suggest(str(group), '_modifiers')}`"
            )
        if not isinstance(modifiers, dict) or not modifiers:
            raise ValueError(
                f"recipe {source}: `{where}` must map modifier names to their settings; got "
                f"{type(modifiers).__name__ if modifiers is not None else 'nothing'}; e.g. "
                "`SVDLLMModifier: {ratio: 0.2}`"
            )
        for name, settings in modifiers.items():
            if not isinstance(settings, dict):
                raise ValueError(
                    f"recipe {source}: `{where}.{name}` must be a mapping of settings; got "
                    f"{'nothing' if settings is None else type(settings).__name__}; write `{name}: {{}}` "
                    "for its defaults"
                )


def _suggest(key: str, suffix: str) -> str:
    stem = key.rstrip("_0123456789s") if not key.endswith(suffix) else key
    for tail in ("_stage", "_stag", "_sta", "_modifiers", "_modifier", "_modifer"):
        stem = stem.removesuffix(tail)
    digits = key[len(key.rstrip("0123456789")) :]
    return f"{stem or 'my'}{digits}{suffix}"


# ---------------------------------------------------------------- kinds of modifiers


def _is_svd(modifier) -> bool:
    from svdllm_plugin.modifiers.svd import SVDLLMModifier

    return isinstance(modifier, SVDLLMModifier)


def _kind(modifier) -> str | None:
    """``svd``, ``quant``, ``prune`` or None (a modifier whose effect this module does not check)."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    name = type(modifier).__name__
    if _is_svd(modifier):
        return "svd"
    if isinstance(modifier, QuantizationMixin):
        return "quant"
    if "Pruning" in name or name in ("SparseGPTModifier", "WandaPruningModifier"):
        return "prune"
    return None


def _patterns(modifier) -> list[str]:
    """The module patterns a modifier selects by (quantization: those of its config groups)."""
    kind = _kind(modifier)
    if kind == "quant":
        config = modifier.resolve_quantization_config()
        return sorted({t for group in config.config_groups.values() for t in group.targets})
    if kind is None and type(modifier).__name__ != "SequentialLoRAModifier":
        return []
    if type(modifier).__name__ == "MagnitudePruningModifier":  # its targets name parameters
        return []
    targets = getattr(modifier, "targets", None)
    targets = [targets] if isinstance(targets, str) else targets
    return [t for t in targets or [] if isinstance(t, str) and t != "__ALL__"]


def check_order(modifiers) -> None:
    """Quantization or pruning before an SVDLLMModifier: the SVD replaces the Linears it changed."""
    for i, modifier in enumerate(modifiers):
        svd = next((m for m in modifiers[i + 1 :] if _is_svd(m)), None)
        if svd is not None and _kind(modifier) in ("quant", "prune"):
            name = type(modifier).__name__
            raise ValueError(
                f"recipe: {name} comes before SVDLLMModifier, which replaces the Linears by new factor "
                f"Linears (svd_u, svd_v): {name} would find no modules to act on or its work would be "
                f"lost; move {name} after SVDLLMModifier"
            )


# ---------------------------------------------------------------- against the model


def _placeholder(cls: type) -> nn.Module:
    return cls.__new__(cls)  # only its class is read by the matching


def check_against_model(modifiers, model: nn.Module) -> None:
    """Before calibration: every ``targets`` and ``overrides`` pattern matches a module of the
    model as each modifier will see it (after the SVD modifiers before it have factorized)."""
    from compressed_tensors.utils import match_named_modules, match_targets

    from svdllm_plugin.layers import SVDLinear
    from svdllm_plugin.modifiers.svd.base import _matches

    view = dict(model.named_modules())
    factorized = False
    for modifier in modifiers:
        name = type(modifier).__name__
        for pattern in _patterns(modifier):
            if not any(match_targets(n, m, [pattern]) for n, m in view.items()):
                also = (
                    " nor the factors svd_u / svd_v an earlier SVDLLMModifier creates" if factorized else ""
                )
                examples = ", ".join(n for n, m in view.items() if isinstance(m, nn.Linear))[:120]
                raise ValueError(
                    f"recipe: {name} `targets` pattern {pattern!r} matches no module of the model{also} "
                    f"(Linears: {examples}...); fix the pattern or remove it"
                )
        if not _is_svd(modifier):
            continue
        matched = [
            n
            for n, m in match_named_modules(model, modifier.targets, modifier.ignore)
            if isinstance(m, nn.Linear) and not n.endswith((".svd_u", ".svd_v"))
        ]
        for pattern in modifier.overrides:
            if not any(_matches(n, pattern) for n in matched):
                raise ValueError(
                    f"recipe: SVDLLMModifier `overrides` pattern {pattern!r} matches none of the "
                    f"{len(matched)} modules it compresses (e.g. {matched[0] if matched else 'none'}); "
                    "fix the pattern (`re:` regex or a name suffix such as `mlp.down_proj`) or remove it"
                )
        for n in matched:
            view[n] = _placeholder(SVDLinear)
            view[f"{n}.svd_u"] = view[f"{n}.svd_v"] = _placeholder(nn.Linear)
        factorized = factorized or bool(matched)


# ---------------------------------------------------------------- after oneshot


def model_snapshot(model: nn.Module) -> dict:
    """What ``check_applied`` compares: factorized modules, quantized modules, zero weights."""
    from svdllm_plugin.layers import SVDLinear

    zeros = 0  # a count, not a fraction: a large lm_head would hide the factors' sparsity
    for module in model.modules():
        weight = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
        if weight is not None and weight.device.type != "meta":
            zeros += int((weight == 0).sum())
    return {
        "svd": sum(isinstance(m, SVDLinear) for m in model.modules()),
        "quant": sum(getattr(m, "weight_scale", None) is not None for m in model.modules()),
        "prune": zeros,
    }


def check_applied(modifiers, model: nn.Module, before: dict) -> None:
    """After oneshot: refuse (nothing is saved) when a modifier of the recipe changed nothing."""
    after = model_snapshot(model)
    for modifier in modifiers:
        name, kind = type(modifier).__name__, _kind(modifier)
        if kind is None:
            logger.debug("{}: its effect on the model is not checked", name)
            continue
        if after[kind] > before[kind]:
            continue
        hint = {
            "svd": "no Linear was factorized: check `targets` and `ratio`",
            "quant": "no module has quantized weights: check its targets and its place in the recipe",
            "prune": (
                "no weight was zeroed: llmcompressor's MagnitudePruningModifier prunes only on training "
                "steps; use OneshotMagnitudePruningModifier"
                if name == "MagnitudePruningModifier"
                else "no weight was zeroed: check its targets, `sparsity` and its place in the recipe"
            ),
        }[kind]
        raise RuntimeError(f"recipe: {name} changed nothing in the model ({hint}); nothing was saved")
