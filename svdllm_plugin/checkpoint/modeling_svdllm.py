"""Load an svdllm-plugin compressed folder with stock transformers (copied into every such folder).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names ``svdllm`` as its ``model_type`` and maps ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` to the classes below (``auto_map``). ``SVDLLMConfig`` returns the base
architecture's own config class (``svdllm.base_model_type``, e.g. ``llama``); the model classes
build that architecture's stock transformers class (looked up in transformers' auto mappings)
and replace every Linear listed in ``svdllm.ranks`` by two Linears, ``svd_v`` (rank x in) and
``svd_u`` (out x rank, with the original bias). Everything else, quantized weights included,
is stock transformers: a ``quantization_config`` (compressed-tensors pack-quantized) is loaded
by transformers' own compressed-tensors quantizer, which binds to the ``svd_u`` / ``svd_v``
Linears like to any other.

This file imports only torch and transformers, so the folder loads where the plugin is not
installed. A folder that lacks a tensor the structure needs, or holds one it has no place for,
is an error naming the tensors: nothing is silently initialised or dropped.

Load-time inference options (``svdllm_runtime`` in config.json, or
``from_pretrained(..., svdllm_runtime={...})``) are applied by ``_apply_runtime_options`` after
loading, through ``svdllm_runtime.py`` in the same folder.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

MODEL_TYPE = "svdllm"
CONFIG_KEY = "svdllm"  # config.json: {"version", "format", "ranks", "base_model_type", ...}
RUNTIME_KEY = "svdllm_runtime"  # config.json or from_pretrained kwarg: load-time inference options

__all__ = ["SVDLinear", "CompensatedLinear", "SVDLLMConfig", "SVDLLMModel", "SVDLLMForCausalLM"]


class SVDLinear(nn.Module):
    """y = svd_u(svd_v(x)): a Linear (out x in) stored as two factors of rank k."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.svd_v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # (k, n)
        self.svd_u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # (m, k)

    @property
    def rank(self) -> int:
        return self.svd_v.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.svd_u(self.svd_v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CompensatedLinear(nn.Module):
    """y = base(x) + lowrank_l(lowrank_r(x)): a quantized Linear plus a low-rank term fitted to its
    quantization error (``svdllm.compensation`` in config.json names these modules and ranks)."""

    def __init__(self, base: nn.Linear, rank: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        self.lowrank_r = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)  # (r, n)
        self.lowrank_l = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)  # (m, r)

    @property
    def rank(self) -> int:
        return self.lowrank_r.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lowrank_l(self.lowrank_r(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SVDLLMConfig:
    """``auto_map.AutoConfig``: the base architecture's config (e.g. LlamaConfig) read from this folder.

    Not a config class itself: ``from_pretrained`` returns an instance of the base class, so
    everything downstream (attention, generation, quantizers) sees the architecture it knows.
    """

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        pass  # nothing to register: the instances are of the base config class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        record = config_dict.get(CONFIG_KEY) or {}
        base_type = record.get("base_model_type")
        if base_type not in CONFIG_MAPPING:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json's {CONFIG_KEY}.base_model_type is "
                f"{base_type!r}, which this transformers {transformers.__version__} does not know"
            )
        return CONFIG_MAPPING[base_type].from_dict(dict(config_dict, model_type=base_type), **kwargs)

    @classmethod
    def to_base(cls, config):
        """A config still of model_type svdllm (e.g. the plugin's carrier class) as the base config."""
        if config.model_type != MODEL_TYPE:
            return config
        config_dict = config.to_dict()
        base_type = (config_dict.get(CONFIG_KEY) or {}).get("base_model_type")
        return CONFIG_MAPPING[base_type].from_dict(dict(config_dict, model_type=base_type))


class _Entry:
    """``auto_map`` entry: builds the factorized subclass of the base architecture's class."""

    _names: dict[str, str] = {}  # model_type -> transformers class name

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        pass

    @classmethod
    def model_class(cls, config) -> type:
        base = _base_class(config, cls._names)
        restructured = _ranks(config) or _compensation(config)
        return _factorized_class(base, cls._names is MODEL_MAPPING_NAMES) if restructured else base

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if config is None:
            config_kwargs = {
                k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs
            }
            config = SVDLLMConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        config = SVDLLMConfig.to_base(config)
        _refuse_transforms(config, pretrained_model_name_or_path)
        model_class = cls.model_class(config)
        if not (_ranks(config) or _compensation(config)):  # a plain model (this class stays registered)
            return model_class.from_pretrained(
                pretrained_model_name_or_path, *model_args, config=config, **kwargs
            )
        runtime = kwargs.pop(RUNTIME_KEY, None)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = model_class.from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        _check_complete(model, info, pretrained_model_name_or_path)
        model = _apply_runtime_options(model, config, runtime)
        return (model, info) if want_info else model

    @classmethod
    def _from_config(cls, config, **kwargs):
        config = SVDLLMConfig.to_base(config)
        return cls.model_class(config)._from_config(config, **kwargs)

    from_config = _from_config


def _refuse_transforms(config, folder) -> None:
    """transformers' compressed-tensors quantizer does not apply saved transforms (QuIP / SpinQuant
    rotations): loading such a folder here would compute with rotated weights and no rotation."""
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        transforms = quantization.get("transform_config")
    else:
        transforms = getattr(quantization, "transform_config", None)
    if transforms:
        raise ValueError(
            f"{folder} holds compressed-tensors transforms (transform_config), which this transformers "
            f"{transformers.__version__} does not apply; load it with "
            f"svdllm_plugin.checkpoint.load_pretrained"
        )


class SVDLLMModel(_Entry):
    """``auto_map.AutoModel``: the base model (no LM head), factorized. vLLM's Transformers backend
    instantiates this one."""

    _names = MODEL_MAPPING_NAMES


class SVDLLMForCausalLM(_Entry):
    """``auto_map.AutoModelForCausalLM``: the causal LM, factorized."""

    _names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _ranks(config) -> dict[str, int]:
    return dict((getattr(config, CONFIG_KEY, None) or {}).get("ranks") or {})


def _compensation(config) -> dict[str, int]:
    return dict((getattr(config, CONFIG_KEY, None) or {}).get("compensation") or {})


def _compensate(model: nn.Module, ranks: dict[str, int]) -> None:
    """Wrap the Linears named in ``svdllm.compensation`` (after ``_factorize``: names may be factors)."""
    for name, r in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"config.json names {name} as compensated but the model has {type(linear).__name__}"
            )
        W = linear.weight
        layer = CompensatedLinear(linear, r, device=W.device, dtype=W.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _base_class(config, names: dict[str, str]) -> type:
    name = names.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        raise ValueError(
            f"transformers {transformers.__version__} has no class for model_type {config.model_type!r} "
            f"in this auto mapping"
        )
    return getattr(transformers, name)


_CLASSES: dict[tuple[type, bool], type] = {}


def _factorized_class(base: type, base_model: bool) -> type:
    """``base`` whose __init__ swaps the Linears named in ``config.svdllm.ranks`` for SVDLinear.

    Ranks are named from the causal LM (``model.layers.0.self_attn.q_proj``); the base model
    (``base_model=True``) drops its ``base_model_prefix``. The subclass keeps the base's name
    (``LlamaForCausalLM``, defined in this module): it is that model with factorized Linears, and
    transformers' pipelines check the class name against the architectures they support.
    """
    key = (base, base_model)
    if key not in _CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            prefix = f"{base.base_model_prefix}." if base_model else ""
            ranks = {n.removeprefix(prefix): k for n, k in _ranks(config).items() if n.startswith(prefix)}
            _factorize(self, ranks)
            compensation = _compensation(config)
            _compensate(
                self, {n.removeprefix(prefix): r for n, r in compensation.items() if n.startswith(prefix)}
            )

        name = base.__name__
        _CLASSES[key] = type(
            name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[key]


def _factorize(model: nn.Module, ranks: dict[str, int]) -> None:
    for name, k in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"config.json names {name} as factorized but the model has {type(linear).__name__}"
            )
        W = linear.weight
        layer = SVDLinear(
            linear.in_features,
            linear.out_features,
            k,
            bias=linear.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _check_complete(model, info: dict, folder) -> None:
    """A tensor the structure needs but the folder lacks would be randomly initialised, and one it
    has no place for (a stale dense ``q_proj.weight`` beside the factors) would be dropped: refuse
    both, as the plugin's loader does."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"{folder} is incomplete: {len(missing)} tensors the factorized structure needs are not in the "
            f"checkpoint (e.g. {missing[:5]}); they would be randomly initialised"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise ValueError(
            f"{folder} does not fit its config: {len(unexpected)} unexpected tensors the factorized "
            f"structure has no place for (e.g. {unexpected[:5]}); remove them or re-save the folder"
        )


def _apply_runtime_options(model, config, options: dict | None = None):
    """Hook for load-time inference options (fused shared-input factors, latent KV cache, ...).

    ``options`` (the ``svdllm_runtime`` kwarg of from_pretrained) update the ones saved in
    config.json. Each option is implemented in ``svdllm_runtime.py`` beside this file; the
    modules it uses are copied into the folder next to it and imported relatively.
    """
    options = {**(getattr(config, RUNTIME_KEY, None) or {}), **(options or {})}
    if not options:
        return model
    from .svdllm_runtime import apply_runtime_options

    return apply_runtime_options(model, options)
