"""``quantize_pipeline``: a diffusers pipeline with its UNet quantized, in one call.

Collects calibration data with the pipeline's own scheduler (both guidance halves for text
pipelines), runs a preset (``PRESETS`` / ``PREPARE_FLAGS``), converts, and returns a new
pipeline of the same class whose ``unet`` is a :class:`QuantizedUNet`, so ``pipe(...)``
generates as before. The given pipeline and its UNet are not modified.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ModelMixin
from torch import fx

from dmq_fx.errors import ConfigError
from dmq_fx.lowering.compile import compile as compile_graph
from dmq_fx.lowering.convert import BACKENDS, convert_fx
from dmq_fx.methods.float_tuning import TuneFloatParameters
from dmq_fx.methods.mixed_precision import mixed_precision_mapping
from dmq_fx.methods.presets import PREPARE_FLAGS, PRESETS, STAGES
from dmq_fx.quantize.device import batches_to_device, module_device
from dmq_fx.quantize.prepare import prepare_fx
from dmq_fx.quantize.qconfig import (
    ACTIVATION_RANGES,
    check_bits,
    get_default_qconfig_mapping,
)
from dmq_fx.workflow.calibrate import calibrate
from dmq_fx.workflow.calibration_data import (
    CalibrationData,
    collect_calibration_data,
    record_pipeline_inputs,
    select_samples,
)
from dmq_fx.workflow.lora import (
    load_lora,
    lora_adapters,
    read_lora_file,
    remove_lora,
    set_adapters,
)

__all__ = ["QuantizationConfig", "QuantizedUNet", "quantize_pipeline"]


@dataclasses.dataclass
class QuantizationConfig:
    """What :func:`quantize_pipeline` does.

    ``preset``: a name in ``dmq_fx.PRESETS`` ("dmq", "eda-dm", "dmq+eda", "minmax", ...);
    ``weight_bits`` / ``act_bits``: the default qconfig mapping's widths; ``backend``: the
    lowering; ``num_inference_steps``, ``samples_per_step``, ``eta``: the calibration sampler
    (docs/workflow/calibration_data.md); ``selection``: ``"uniform"`` (``samples_per_step`` at
    every step) or
    ``"tdac"`` (EDA-DM's selection of ``num_inference_steps * samples_per_step`` samples, at
    least ``min_per_step`` per step, density radius ``tdac_radius``); ``timestep_tables``:
    per-timestep activation parameters; ``batch_size``: calibration batches; ``seed``;
    ``compile``: run the UNet through :func:`dmq_fx.compile` (torch.compile with inductor: one
    fused graph on int8 kernels; the first call of each batch shape compiles, a minute or more).
    ``mixed_precision_bits``: automatic mixed precision (:func:`dmq_fx.mixed_precision_mapping`
    on two calibration batches): 8-bit weights for the layers where ``weight_bits`` hurts most,
    within that average weight width; None (default): every layer at ``weight_bits``.
    ``activation_ranges``: how the activation ranges are observed, ``"minmax"`` (moving-average
    min / max) or ``"histogram"`` (the range of least error in a histogram of every calibration
    value, :class:`dmq_fx.observers.HistogramRangeObserver`; one process only).
    """

    preset: str = "dmq"
    weight_bits: int = 4
    act_bits: int = 8
    backend: str = "x86"
    num_inference_steps: int = 20
    samples_per_step: int = 32
    eta: float = 1.0
    selection: str = "uniform"
    min_per_step: int = 0
    tdac_radius: float = 3.0
    timestep_tables: bool = False
    batch_size: int = 32
    seed: int = 0
    compile: bool = False
    mixed_precision_bits: float | None = None
    activation_ranges: str = "minmax"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        budget = self.mixed_precision_bits
        if budget is not None and not self.weight_bits <= budget <= 8:
            raise ConfigError(
                f"mixed_precision_bits={budget}: expected a value from weight_bits "
                f"({self.weight_bits}) to 8"
            )
        if self.activation_ranges not in ACTIVATION_RANGES:
            raise ConfigError(
                f"activation_ranges must be one of {ACTIVATION_RANGES}, "
                f"got {self.activation_ranges!r}"
            )
        if self.selection not in ("uniform", "tdac"):
            raise ConfigError(f"selection must be 'uniform' or 'tdac', got {self.selection!r}")
        for name in ("num_inference_steps", "samples_per_step", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_value(cls, config: QuantizationConfig | str | Mapping[str, Any]) -> QuantizationConfig:
        """A config from itself, a preset name, or a dict of fields."""
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(preset=config)
        if isinstance(config, Mapping):
            unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"unknown QuantizationConfig fields {sorted(unknown)}")
            return cls(**config)
        raise ConfigError(
            f"config must be a QuantizationConfig, a preset name or a dict, got "
            f"{type(config).__name__}"
        )


class QuantizedUNet(ModelMixin):
    """A converted graph in the place of a diffusers UNet: the float UNet's ``config``,
    ``dtype`` and ``device`` (what pipelines read) around the quantized forward, and the adapter
    methods a pipeline's ``load_lora_weights`` / ``set_adapters`` / ``unload_lora_weights`` call
    (LoRA as float branches beside the quantized layers: :func:`dmq_fx.load_lora`). A diffusers
    ``ModelMixin``, because pipelines look for adapters on those."""

    def __init__(
        self, graph: fx.GraphModule, config: Any, dtype: torch.dtype, compiled: bool = False
    ):
        super().__init__()
        self.graph = graph
        self.config = config
        self._dtype = dtype
        #: the torch.compile version of ``graph`` that forward runs, or None (eager)
        self.compiled = compile_graph(graph) if compiled else None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        tensors = [*self.graph.parameters(), *self.graph.buffers()]
        return tensors[0].device if tensors else torch.device("cpu")

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        run = self.compiled if self.compiled is not None else self.graph
        return run(sample, timestep, *args, **kwargs)

    # -- LoRA, as diffusers pipelines call it -------------------------------------------------
    @property
    def peft_config(self) -> dict[str, None]:
        """The loaded adapters by name (diffusers' pipelines list adapters from it)."""
        return dict.fromkeys(lora_adapters(self.graph))

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        prefix: str | None = "unet",
        network_alphas: Mapping[str, float] | None = None,
        adapter_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """What ``pipe.load_lora_weights`` calls: the UNet's keys (``prefix.``) of the LoRA as
        float branches (:func:`dmq_fx.load_lora`); alphas from ``network_alphas`` or the
        adapter ``metadata``'s ``lora_alpha``."""
        state = _under_prefix(read_lora_file(pretrained_model_name_or_path_or_dict), prefix)
        alphas = _under_prefix(network_alphas or {}, prefix)
        alphas = {k: torch.tensor(float(v)) for k, v in alphas.items()}
        name = adapter_name or f"default_{len(self.peft_config)}"
        lora_alpha = (metadata or {}).get("lora_alpha")
        load_lora(self.graph, {**state, **alphas}, name, lora_alpha=lora_alpha)
        self._graph_changed()

    def set_adapters(self, adapter_names: str | Sequence[str], weights: Any = None) -> None:
        """Make ``adapter_names`` the active adapters, scaled by ``weights`` (None: 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else weights] * len(names)
        weights = [1.0 if w is None else float(w) for w in weights]
        set_adapters(self.graph, names, weights)
        self._graph_changed()

    def unload_lora(self) -> None:
        """Remove every adapter: the graph is the converted one again."""
        for name in lora_adapters(self.graph):
            remove_lora(self.graph, name)
        self._graph_changed()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            remove_lora(self.graph, name)
        self._graph_changed()

    def _graph_changed(self) -> None:
        if self.compiled is not None:  # compile the new graph at its next call
            self.compiled = compile_graph(self.graph)

    def __getattr__(self, name: str) -> Any:
        # pipelines read a few UNet submodules (SDXL: ``add_embedding.linear_1.in_features``);
        # the graph keeps them under the same names (float ones as they were)
        try:
            return super().__getattr__(name)
        except AttributeError:
            graph = super().__getattr__("graph")
            found = getattr(graph, name, None)
            if isinstance(found, torch.nn.Module):
                return found
            raise


def _prompt_embeddings(pipe: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """``collect_calibration_data`` keywords from ``{"prompts": [...], "negative_prompt": ...,
    "guidance_scale": ...}``, encoded with the pipeline's own ``encode_prompt``."""
    if not hasattr(pipe, "encode_prompt"):
        raise ConfigError(
            f"{type(pipe).__name__} has no encode_prompt: pass prompt_embeds and "
            "negative_prompt_embeds in calibration= instead of prompts"
        )
    guidance = float(spec.get("guidance_scale", 7.5))
    encoder = getattr(pipe, "text_encoder", None)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(
            list(spec["prompts"]),
            module_device(encoder) if encoder is not None else torch.device("cpu"),
            1,
            guidance > 1.0,
            negative_prompt=spec.get("negative_prompt"),
        )
    out = {"prompt_embeds": cond, "guidance_scale": guidance}
    if guidance > 1.0:
        out["negative_prompt_embeds"] = uncond[:1]
    return out


def _under_prefix(entries: Mapping[str, Any], prefix: str | None) -> dict[str, Any]:
    """The entries under ``prefix.`` with it stripped; all of them if none has it (keys may be
    indexed into the UNet directly, as diffusers allows)."""
    head = f"{prefix}." if prefix else ""
    if not head or not any(k.startswith(head) for k in entries):
        return dict(entries)
    return {k[len(head) :]: v for k, v in entries.items() if k.startswith(head)}


def _calls_the_pipeline(pipe: Any, options: Mapping[str, Any]) -> bool:
    """Whether calibration data comes from the pipeline's own call: pipelines whose UNet takes
    more than the prompt embeddings (SDXL's added embeddings, a ControlNet's residuals, LCM's
    guidance embedding), or when ``pipeline_kwargs`` are given."""
    return (
        "pipeline_kwargs" in options
        or getattr(pipe, "text_encoder_2", None) is not None
        or getattr(pipe, "controlnet", None) is not None
        or getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None
        or getattr(pipe.unet.config, "addition_embed_type", None) is not None
    )


def _recorded(pipe: Any, cfg: QuantizationConfig, options: Mapping[str, Any]) -> CalibrationData:
    """The UNet inputs of one run of the pipeline itself on the calibration prompts."""
    allowed = {"prompts", "negative_prompt", "guidance_scale", "pipeline_kwargs"}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(
            f"calibration= through {type(pipe).__name__}'s own call takes {sorted(allowed)}, "
            f"got {sorted(unknown)}"
        )
    call = dict(options.get("pipeline_kwargs", {}))
    for key in ("negative_prompt", "guidance_scale"):
        if key in options:
            call[key] = options[key]
    recorded = record_pipeline_inputs(
        pipe,
        list(options["prompts"]),
        num_inference_steps=cfg.num_inference_steps,
        seed=cfg.seed,
        progress=False,
        **call,
    )
    if cfg.selection == "tdac":  # one sample per prompt, spread over the steps by TDAC
        return select_samples(
            pipe.unet,
            n=len(set(recorded.trajectory.tolist())),
            radius=cfg.tdac_radius,
            min_per_step=cfg.min_per_step,
            seed=cfg.seed,
            progress=False,
            pool=recorded,
        )
    return recorded


def _calibration_data(
    pipe: Any, cfg: QuantizationConfig, calibration: Any, progress: bool
) -> CalibrationData:
    if isinstance(calibration, CalibrationData):
        return calibration
    options = dict(calibration or {})
    if "prompts" in options and _calls_the_pipeline(pipe, options):
        return _recorded(pipe, cfg, options)
    if "prompts" in options:
        options = {**_prompt_embeddings(pipe, options)}
    allowed = {"prompt_embeds", "negative_prompt_embeds", "guidance_scale", "num_class_labels"}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(
            f"calibration= takes CalibrationData or a dict of {sorted(allowed | {'prompts'})}, "
            f"got {sorted(unknown)}"
        )
    common = dict(
        num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, seed=cfg.seed, progress=progress
    )
    if cfg.selection == "tdac":
        return select_samples(
            pipe.unet,
            pipe.scheduler,
            cfg.num_inference_steps * cfg.samples_per_step,
            radius=cfg.tdac_radius,
            min_per_step=cfg.min_per_step,
            **common,
            **options,
        )
    return collect_calibration_data(
        pipe.unet, pipe.scheduler, samples_per_step=cfg.samples_per_step, **common, **options
    )


def _calibrate(
    prepared: Any,
    data: CalibrationData,
    batches: list,
    cfg: QuantizationConfig,
    device: torch.device,
    progress: bool,
) -> None:
    """The preset's stages; on data sampled with classifier-free guidance, a last
    ``tune_float_params`` matches the guided prediction, on batches of guidance pairs
    (docs/methods/float_tuning.md)."""
    stages = list(PRESETS[cfg.preset])
    guided = data.guidance_scale > 1.0 and data.unconditional is not None
    if not (guided and stages and isinstance(STAGES[stages[-1]], TuneFloatParameters)):
        calibrate(prepared, batches, stages, progress=progress)
        return
    calibrate(prepared, batches, stages[:-1], progress=progress)
    size = max(2, cfg.batch_size - cfg.batch_size % 2)
    pairs = batches_to_device(list(data.batches(size, seed=cfg.seed, guidance_pairs=True)), device)
    tuning = dataclasses.replace(STAGES[stages[-1]], guidance_scale=data.guidance_scale)
    calibrate(prepared, pairs, [tuning], progress=progress)


def quantize_pipeline(
    pipe: Any,
    config: QuantizationConfig | str | Mapping[str, Any] = "dmq",
    calibration: CalibrationData | Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
) -> Any:
    """Quantize the UNet of a diffusers pipeline and return a pipeline that uses it.

    Args:
        pipe: a pipeline with ``unet`` and ``scheduler`` components (DDPMPipeline,
            DDIMPipeline, StableDiffusionPipeline and others built around a UNet).
        config: a :class:`QuantizationConfig`, a preset name, or a dict of its fields.
        calibration: recorded data (:class:`~dmq_fx.calibration.CalibrationData`), or the
            conditioning to sample it with: ``{"prompts": [...], "negative_prompt": ...,
            "guidance_scale": 7.5}`` (encoded by the pipeline's ``encode_prompt``; for
            SDXL, LCM and ControlNet pipelines, and with ``"pipeline_kwargs"`` such as a
            ControlNet's ``image``, recorded from one run of the pipeline itself:
            :func:`~dmq_fx.calibration.record_pipeline_inputs`), or
            ``prompt_embeds`` / ``negative_prompt_embeds`` / ``guidance_scale`` /
            ``num_class_labels`` as for
            :func:`~dmq_fx.calibration.collect_calibration_data`.
            None: unconditional sampling with the pipeline's scheduler.

    Returns a new pipeline of ``pipe``'s class sharing its other components, with ``unet`` a
    :class:`QuantizedUNet`; the quantized graph is ``result.unet.graph`` (for
    :func:`dmq_fx.summary` and :func:`dmq_fx.save`).
    """
    cfg = QuantizationConfig.from_value(config)
    for name in ("unet", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise ConfigError(f"quantize_pipeline needs a pipeline with a {name!r} component")
    if isinstance(pipe.unet, QuantizedUNet):
        raise ConfigError("the pipeline's UNet is already quantized")
    device = module_device(pipe.unet)
    if device.type != "cpu" and cfg.backend != "reference":
        # said before calibrating, not after: convert_fx would refuse the calibrated graph
        raise ConfigError(
            f"the pipeline's UNet is on {device} and backend {cfg.backend!r} runs onednn's CPU "
            f"kernels: quantize with backend='reference' to run on {device.type}, or move the "
            "pipeline to the CPU (pipe.to('cpu')) first"
        )
    data = _calibration_data(pipe, cfg, calibration, progress)
    # the data is moved to the UNet's device once: tracing, ranking and calibration run there
    batches = batches_to_device(list(data.batches(cfg.batch_size, seed=cfg.seed)), device)
    example = data.batches(min(8, len(data)), shuffle=False).__next__()
    example_args, example_kwargs = batches_to_device([example], device)[0]
    mapping = get_default_qconfig_mapping(cfg.weight_bits, cfg.act_bits, cfg.activation_ranges)
    if cfg.mixed_precision_bits is not None:
        mapping = mixed_precision_mapping(
            pipe.unet,
            batches[:2],
            cfg.weight_bits,
            cfg.act_bits,
            cfg.mixed_precision_bits,
            mapping,
            progress,
        ).mapping
    prepared = prepare_fx(
        pipe.unet,
        mapping,
        example_args,
        example_kwargs,
        **PREPARE_FLAGS[cfg.preset],
        timestep_tables=cfg.timestep_tables,
    )
    _calibrate(prepared, data, batches, cfg, device, progress)
    lowered = convert_fx(prepared, cfg.backend)
    quantized = QuantizedUNet(lowered, pipe.unet.config, pipe.unet.dtype, compiled=cfg.compile)
    # a scheduler of its own: set_timesteps on one pipeline must not move the other's
    components = dict(pipe.components, unet=quantized, scheduler=copy.deepcopy(pipe.scheduler))
    return type(pipe)(**components)
