"""Load an svdllm-plugin compressed folder with stock transformers (copied into every such folder).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names ``svdllm`` as its ``model_type`` and maps ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` to classes of this module (``auto_map``). ``SVDLLMConfig`` returns the
base architecture's own config class (``svdllm.base_model_type``, e.g. ``llama``). The model
entries name the base architecture's own classes (``modeling_svdllm.LlamaForCausalLM``,
``modeling_svdllm.LlamaModel``): this module defines them on first access (module
``__getattr__``) as real subclasses of the stock transformers classes whose ``__init__`` replaces
every Linear listed in ``svdllm.ranks`` by two Linears, ``svd_v`` (rank x in) and ``svd_u``
(out x rank, with the original bias). Being ``PreTrainedModel`` subclasses with the base's
attention-interface support, they are what vLLM's Transformers backend accepts
(``LLM(model=folder, trust_remote_code=True)``); their tensor-parallel plan splits each
factorized projection so the math stays exact (``_factorized_tp_plan``). Folders that name
``SVDLLMForCausalLM`` / ``SVDLLMModel`` in their auto_map (written before) still load.
Everything else, quantized weights included, is stock transformers: a ``quantization_config``
(compressed-tensors pack-quantized) is loaded by transformers' own compressed-tensors quantizer,
which binds to the ``svd_u`` / ``svd_v`` Linears like to any other.

This file imports only torch and transformers, so the folder loads where the plugin is not
installed. A folder that lacks a tensor the structure needs, or holds one it has no place for,
is an error naming the tensors: nothing is silently initialised or dropped.

Load-time inference options (``svdllm_runtime`` in config.json, or
``from_pretrained(..., svdllm_runtime={...})``) are applied by ``_apply_runtime_options`` after
loading, through ``svdllm_runtime.py`` in the same folder, which also holds the completeness check.
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

__all__ = ["SVDLinear", "CompensatedLinear", "SVDLLMConfig", "SVDLLMModel", "SVDLLMForCausalLM", "auto_map"]


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
        config = _folder_config(pretrained_model_name_or_path, config, kwargs)
        return cls.model_class(config).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )

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
    """``auto_map.AutoModel`` of folders written before the base-class entries: the base model."""

    _names = MODEL_MAPPING_NAMES


class SVDLLMForCausalLM(_Entry):
    """``auto_map.AutoModelForCausalLM`` of folders written before the base-class entries."""

    _names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def auto_map(base_model_type: str) -> dict[str, str]:
    """config.json's ``auto_map`` for a folder of ``base_model_type``: the factorized base classes."""
    entries = {"AutoConfig": "modeling_svdllm.SVDLLMConfig"}
    for key, names, fallback in (
        ("AutoModel", MODEL_MAPPING_NAMES, "SVDLLMModel"),
        ("AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "SVDLLMForCausalLM"),
    ):
        name = names.get(base_model_type)
        entries[key] = f"modeling_svdllm.{name if name and hasattr(transformers, name) else fallback}"
    return entries


def __getattr__(name: str) -> type:
    """``modeling_svdllm.LlamaForCausalLM`` (an auto_map entry): the factorized subclass of that class."""
    for names, base_model in ((MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, False), (MODEL_MAPPING_NAMES, True)):
        if name in names.values() and hasattr(transformers, name):
            return _factorized_class(getattr(transformers, name), base_model)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _folder_config(folder, config, kwargs: dict):
    """The base architecture's config of ``folder`` (``config`` if given, carrier configs converted);
    folders holding transforms this transformers cannot apply are refused."""
    if config is None:
        config_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs
        }
        config = SVDLLMConfig.from_pretrained(folder, **config_kwargs)
    config = SVDLLMConfig.to_base(config)
    _refuse_transforms(config, folder)
    return config


def _ranks(config) -> dict[str, int]:
    return dict((getattr(config, CONFIG_KEY, None) or {}).get("ranks") or {})


def _compensation(config) -> dict[str, int]:
    return dict((getattr(config, CONFIG_KEY, None) or {}).get("compensation") or {})


def _compensate(model: nn.Module, ranks: dict[str, int]) -> None:
    """Wrap the Linears named in ``svdllm.compensation`` (after ``_factorize``: names may be factors)."""
    for name, r in ranks.items():
        linear = _named_linear(model, name, "compensated")
        W = linear.weight
        _set_module(model, name, CompensatedLinear(linear, r, device=W.device, dtype=W.dtype))


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
            if getattr(config, "_attn_implementation", None) == "vllm":  # vLLM's Transformers backend
                from .svdllm_runtime import check_vllm_kernels

                check_vllm_kernels(config)
            base.__init__(self, config, *args, **kwargs)
            prefix = f"{base.base_model_prefix}." if base_model else ""
            ranks = {n.removeprefix(prefix): k for n, k in _ranks(config).items() if n.startswith(prefix)}
            _factorize(self, ranks)
            compensation = _compensation(config)
            _compensate(
                self, {n.removeprefix(prefix): r for n, r in compensation.items() if n.startswith(prefix)}
            )
            for module in (self, getattr(self, base.base_model_prefix, None)):
                if isinstance(getattr(module, "_tp_plan", None), dict) and ranks:
                    module._tp_plan = _factorized_tp_plan(module._tp_plan)

        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
            config = _folder_config(pretrained_model_name_or_path, config, kwargs)
            runtime = kwargs.pop(RUNTIME_KEY, None)
            want_info = kwargs.pop("output_loading_info", False)
            model, info = base.from_pretrained.__func__(
                cls,
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                output_loading_info=True,
                **kwargs,
            )
            if _ranks(config) or _compensation(config):
                from .svdllm_runtime import check_complete  # a tensor missing or left over: an error

                check_complete(model, info, pretrained_model_name_or_path)
                model = _apply_runtime_options(model, config, runtime)
            return (model, info) if want_info else model

        def _from_config(cls, config, **kwargs):
            return base._from_config.__func__(cls, SVDLLMConfig.to_base(config), **kwargs)

        name = base.__name__
        _CLASSES[key] = type(
            name,
            (base,),
            {
                "__init__": __init__,
                "from_pretrained": classmethod(from_pretrained),
                "_from_config": classmethod(_from_config),
                # auto classes register remote classes to save their code with the model: nothing to
                # copy here (save_pretrained of a factorized model is the plugin's job)
                "register_for_auto_class": classmethod(lambda cls, auto_class=None: None),
                "__module__": __name__,
                "__qualname__": name,
            },
        )
    return _CLASSES[key]


def _factorized_tp_plan(plan: dict[str, str]) -> dict[str, str]:
    """The tensor-parallel plan of a factorized model: each split projection's math stays exact.

    y = U (V x): a column-parallel projection becomes a column-parallel ``svd_u`` after a
    replicated ``svd_v`` (every rank computes the whole rank-k V x); a row-parallel one becomes a
    row-parallel ``svd_v`` (its partial V x all-reduced) before a replicated ``svd_u``. The factor
    entries come first: plans match by prefix (vLLM takes the first pattern that matches), and
    the projection's own entry still serves the dense-kept layers.
    """
    replicate = (
        "replicated_with_grad_allreduce"  # a style both transformers and vLLM accept (vLLM: replicated)
    )
    factors = {}
    for pattern, style in plan.items():
        if style in ("colwise", "rowwise"):
            u, v = (style, replicate) if style == "colwise" else (replicate, style)
            factors.update({f"{pattern}.svd_u": u, f"{pattern}.svd_v": v})
    return {**factors, **plan}


def _factorize(model: nn.Module, ranks: dict[str, int]) -> None:
    for name, k in ranks.items():
        linear = _named_linear(model, name, "factorized")
        W = linear.weight
        layer = SVDLinear(
            linear.in_features,
            linear.out_features,
            k,
            bias=linear.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        parent = _set_module(model, name, layer)
        if parent is not model:
            parent.__class__ = _holder_class(type(parent))


def _named_linear(model: nn.Module, name: str, kind: str) -> nn.Linear:
    """The Linear config.json names as ``kind`` (factorized, compensated); an error if it is none."""
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"config.json names {name} as {kind} but the model has {type(linear).__name__}")
    return linear


def _set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns its parent."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    return parent


_HOLDERS: dict[type, type] = {}


def _holder_class(cls: type) -> type:
    """``cls`` (e.g. LlamaAttention) as a same-named subclass for modules holding an SVDLinear.

    Code that caches per module class what it learnt from one instance (vLLM's Transformers
    backend traces one attention per class to fuse its q/k/v Linears) must not apply what a
    dense-kept layer taught it to a factorized one. It keeps the base's ``__module__``: code that
    finds the architecture's functions through it (the latent KV cache's rotary) still does.
    """
    if getattr(cls, "_svdllm_holder", False):
        return cls
    if cls not in _HOLDERS:
        _HOLDERS[cls] = type(
            cls.__name__,
            (cls,),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_svdllm_holder": True},
        )
    return _HOLDERS[cls]


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
