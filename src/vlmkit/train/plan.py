"""`vlmkit plan CONFIG`: GPU memory a run needs, estimated from model configs alone (no weights).

The model is built on the meta device (`accelerate.init_empty_weights`), so parameter counts are
exact; memory follows from them: weights by dtype or 4/8-bit quantisation, LoRA weights, gradients
and optimiser state of what trains, and activations from batch x sequence x hidden x layers (the
Korthikanti et al. estimate of ~34 bytes per token per hidden unit per layer in half precision,
with SDPA/flash attention so no seq^2 term), with and without gradient checkpointing. DDP keeps a
full copy per GPU; ZeRO-2 shards gradients + optimiser state; ZeRO-3 / FSDP full-shard also
shard the weights. Estimates, not promises: allocator fragmentation and kernels' workspaces vary.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vlmkit.config import RunConfig
from vlmkit.errors import ConfigError

logger = logging.getLogger(__name__)

GiB = 1024**3
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes of optimiser state per trainable parameter (torch Adam keeps two states in the param dtype).
EIGHT_BIT_OPTIMS = frozenset(
    {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit"}
)
STATELESS_OPTIMS = frozenset({"sgd"})
CUDA_CONTEXT_BYTES = int(0.8 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, per GPU
ACTIVATION_BYTES_PER_UNIT = 34  # per token, per hidden unit, per layer, at 2 bytes per value
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + double-quantised absmax per 64-block
INT8_BYTES = 1.0 + 4 / 4096  # int8 weights + a per-row fp32 scale (rows ~4k wide)


# -- building the skeleton -------------------------------------------------------------------------
def _config_of(source: str) -> Any:
    from transformers import AutoConfig

    from vlmkit.models.vlm import register_auto_classes

    register_auto_classes()  # a vlmkit_vlm folder
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the config of {source} ({exc}); download it or check the name"
        ) from None


def _part_config(part: Any) -> Any:
    from transformers import AutoConfig

    return _config_of(part.pretrained) if part.pretrained else AutoConfig.for_model(**part.config)


def meta_model(config: RunConfig) -> nn.Module:
    """The run's model with every weight on the meta device (exact shapes, no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = _build_meta(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings are one tensor, as in the loaded model
    return model


def _build_meta(config: RunConfig) -> nn.Module:
    section = config.model
    if section.init is not None:
        return _meta_vlm(section.init)
    model_config = _config_of(section.pretrained)
    if model_config.model_type == "vlmkit_vlm":
        from vlmkit.models.vlm import VisionLanguageModel

        return VisionLanguageModel(model_config)
    from vlmkit.models.adapters.families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(model_config.model_type)
    if family is not None and family.model_class is not None:
        import transformers

        return getattr(transformers, family.model_class)(model_config)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(model_config)


def _meta_vlm(spec: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from vlmkit.models.vision import vision_config_of
    from vlmkit.models.vlm import VisionLanguageModel, VLMConfig, register_auto_classes

    register_auto_classes()
    vision_config = vision_config_of(_part_config(spec.vision))
    if spec.vision.config is not None and hasattr(vision_config, "image_size"):
        vision_config.image_size = spec.image_size
    text_config = _part_config(spec.language_model)
    if spec.language_model.config is not None and "vocab_size" not in spec.language_model.config:
        text_config.vocab_size = spec.tokenizer.vocab_size  # a trained tokenizer's upper bound
    vlm_config = VLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        projector=spec.projector,
        projector_hidden_size=spec.projector_hidden_size,
        projector_kwargs=spec.projector_kwargs or None,
        vision_feature_select=spec.feature_select,
        image_size=spec.image_size,
    )
    language_model = AutoModelForCausalLM.from_config(text_config)
    return VisionLanguageModel(vlm_config, language_model=language_model)


# -- counting ---------------------------------------------------------------------------------
def _parts(model: nn.Module) -> Any:
    from vlmkit.models.adapters.families import parts_of

    return parts_of(getattr(model.config, "model_type", None))


def parameter_counts(model: nn.Module, config: RunConfig) -> dict[str, int]:
    """Exact counts: total, per part, quantisable (linear weights outside the head), LoRA, trainable."""
    from vlmkit.train.peft import lora_target_modules, part_of

    parts = _parts(model)
    counts = {"total": 0, "vision": 0, "projector": 0, "language": 0}
    for name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        part = part_of(name.rsplit(".", 1)[0], parts) if parts else "language"
        counts[part or "language"] += parameter.numel()
    head = model.get_output_embeddings()
    counts["quantisable"] = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Linear) and module is not head
    )
    lora = config.model.lora
    if lora is not None:
        modules = dict(model.named_modules())
        targets = lora_target_modules(model, lora)
        counts["lora"] = sum(lora.r * (modules[t].in_features + modules[t].out_features) for t in targets)
        saved = set(lora.modules_to_save or [])
        counts["modules_to_save"] = sum(
            p.numel()
            for name, module in modules.items()
            if name.rsplit(".", 1)[-1] in saved
            for p in module.parameters()
        )
        counts["trainable"] = counts["lora"] + counts["modules_to_save"]
    else:
        frozen = config.freeze
        counts["lora"] = 0
        counts["trainable"] = (
            counts["total"]
            - (counts["vision"] if frozen.vision else 0)
            - (counts["projector"] if frozen.projector else 0)
            - (counts["language"] if frozen.lm else 0)
        )
    return counts


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vision_dims(model: nn.Module) -> tuple[int, int, int]:
    """(hidden size, layers, image tokens at the tower) of the vision tower, 0s when unknown."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        return 0, 0, 0
    hidden = getattr(vision, "hidden_size", 0) or getattr(vision, "embed_dim", 0)
    layers = getattr(vision, "num_hidden_layers", 0) or getattr(vision, "depth", 0)
    size, patch = getattr(vision, "image_size", 0), getattr(vision, "patch_size", 0)
    tokens = (size // patch) ** 2 if size and patch and isinstance(patch, int) else 0
    return int(hidden or 0), int(layers or 0), int(tokens)


def image_tokens(model: nn.Module, config: RunConfig) -> int:
    """Image tokens the LM sees per sample, from the model config (Qwen2-VL: max_pixels)."""
    model_config = model.config
    text = _text_config(model)
    if getattr(text, "num_image_tokens", None):
        return int(text.num_image_tokens)
    if getattr(model_config, "image_seq_length", None):
        return int(model_config.image_seq_length)
    if model_config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        vision = model_config.vision_config
        unit = (vision.patch_size * vision.spatial_merge_size) ** 2
        # Qwen's own cap is 16384 * 28 * 28 pixels; set adapter_options.max_pixels to bound it.
        return int(config.model.adapter_options.get("max_pixels") or 1280 * 28 * 28) // unit
    tokens = _vision_dims(model)[2]
    if model_config.model_type == "vlmkit_vlm" and tokens:
        return tokens + (1 if model_config.vision_feature_select == "cls_patch" else 0)
    return tokens


# -- the plan ----------------------------------------------------------------------------------
def _weight_bytes(counts: dict[str, int], config: RunConfig) -> tuple[float, str]:
    section = config.model
    dtype = section.dtype or "float32"  # what the runner loads when model.dtype is unset
    quant = section.quantization
    if quant is None:
        return counts["total"] * DTYPE_BYTES[dtype], dtype
    rest_dtype = section.dtype or quant.compute_dtype
    per = NF4_BYTES if quant.bits == 4 else INT8_BYTES
    rest = counts["total"] - counts["quantisable"]
    return counts["quantisable"] * per + rest * DTYPE_BYTES[rest_dtype], f"{quant.bits}-bit + {rest_dtype}"


def _optimizer_bytes_per_param(optim: str, param_bytes: int) -> float:
    if optim in EIGHT_BIT_OPTIMS:
        return 2.0
    if optim in STATELESS_OPTIMS:
        return 0.0
    if optim.startswith("adafactor"):
        return 0.1 * param_bytes  # factored second moment: rows + columns, not rows x columns
    return 2.0 * param_bytes


def _shard(value: float, gpus: int, sharded: bool) -> float:
    return value / gpus if sharded else value


def objective_memory(
    config: RunConfig, text: Any, batch: int, sequence: int, half: bool, weight_bytes: float
) -> dict[str, Any]:
    """What DPO / GRPO add to an SFT step (the most demanding stage counts).

    DPO: 2 x batch rows (chosen and rejected); the reference is the base with LoRA disabled (one
    more no-grad forward: its logits), or log-probabilities cached before training (nothing on the
    GPU). GRPO: batch x num_generations rows of prompt + max_new_tokens; sampling them keeps a KV
    cache of those rows; a KL term (beta > 0) needs a reference: LoRA disabled, or a frozen copy
    of the weights. vlmkit reads log-probabilities from the model's full logits (all positions).
    """
    stages = config.resolved_stages()
    stage = next((s for s in stages if s.objective == "grpo"), None) or next(
        (s for s in stages if s.objective == "dpo"), stages[0]
    )
    plan: dict[str, Any] = {
        "name": stage.objective,
        "rows": batch,
        "logit_passes": 1,
        "reference": "none",
        "reference_bytes": 0.0,
        "kv_cache_bytes": 0.0,
    }
    lora = config.model.lora is not None
    if stage.objective == "dpo" and stage.dpo is not None:
        reference = (
            stage.dpo.reference if stage.dpo.reference != "auto" else ("adapter" if lora else "cached")
        )
        plan.update(rows=2 * batch, reference=reference, logit_passes=2 if reference == "adapter" else 1)
    elif stage.objective == "grpo" and stage.grpo is not None:
        options = stage.grpo
        rows = batch * options.num_generations
        reference = "none"
        if options.beta > 0:
            reference = options.reference if options.reference != "auto" else ("adapter" if lora else "copy")
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        length = sequence + options.max_new_tokens
        kv = 2 * rows * length * int(text.num_hidden_layers) * kv_heads * head_dim * (2 if half else 4)
        plan.update(
            rows=rows,
            reference=reference,
            logit_passes=2 if reference in ("adapter", "copy") else 1,
            kv_cache_bytes=float(kv),
            num_generations=options.num_generations,
            max_new_tokens=options.max_new_tokens,
        )
        if reference == "copy":
            plan["reference_bytes"] = float(weight_bytes)
    return plan


def plan_memory(config: RunConfig, *, gpus: int = 1, strategy: str = "ddp") -> dict[str, Any]:
    """Per-GPU memory estimate (bytes and GiB) of training `config` on `gpus` GPUs with `strategy`.

    Strategies: ddp (replicated), zero2 (shard gradients + optimiser), zero3 / fsdp (shard those and
    the weights). The result also holds the totals of every strategy at this GPU count.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise ConfigError("gpus must be at least 1")
    model = meta_model(config)
    counts = parameter_counts(model, config)
    training = config.training
    weight_bytes, weight_dtype = _weight_bytes(counts, config)

    lora = config.model.lora
    trainable = counts["trainable"]
    if lora is not None:  # peft keeps LoRA weights (and their grads, states) in fp32
        train_param_bytes = 4
        adapter_weight_bytes = counts["lora"] * 4
    else:
        train_param_bytes = DTYPE_BYTES[config.model.dtype or "float32"]
        adapter_weight_bytes = 0
    gradient_bytes = trainable * train_param_bytes
    optim = str(training.get("optim", "adamw_torch"))
    optimizer_bytes = trainable * _optimizer_bytes_per_param(optim, train_param_bytes)

    batch = int(training.get("per_device_train_batch_size", 8))
    n_image = image_tokens(model, config)
    sequence = int(config.model.max_length or (n_image + 128))
    text = _text_config(model)
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    half = bool(training.get("bf16") or training.get("fp16") or config.model.dtype in ("bfloat16", "float16"))
    scale = 1.0 if half else 2.0
    per_layer = ACTIVATION_BYTES_PER_UNIT * batch * sequence * hidden * scale
    full = per_layer * layers
    checkpointed = (2 * batch * sequence * hidden * scale) * layers + per_layer
    v_hidden, v_layers, v_tokens = _vision_dims(model)
    vision_trains = (lora is not None and lora.vision) or (lora is None and not config.freeze.vision)
    if vision_trains and v_hidden:
        v_layer = ACTIVATION_BYTES_PER_UNIT * batch * (v_tokens or n_image) * v_hidden * scale
        full += v_layer * v_layers
        checkpointed += 2 * batch * (v_tokens or n_image) * v_hidden * scale * v_layers + v_layer
    logits = batch * sequence * vocab * (2 + 4 if half else 4 + 4)  # logits + fp32 copy for the loss
    use_checkpointing = bool(training.get("gradient_checkpointing")) or config.model.quantization is not None
    activations = checkpointed if use_checkpointing else full
    objective = objective_memory(config, text, batch, sequence, half, weight_bytes)
    rows = objective["rows"] / batch  # DPO: chosen + rejected; GRPO: num_generations answers per prompt
    activations, full, checkpointed = activations * rows, full * rows, checkpointed * rows
    logits = logits * rows * objective["logit_passes"]

    def total_for(kind: str) -> dict[str, float]:
        shard_weights = kind in ("zero3", "fsdp")
        shard_states = kind != "ddp"
        parts = {
            "weights": _shard(weight_bytes + adapter_weight_bytes, gpus, shard_weights),
            "gradients": _shard(gradient_bytes, gpus, shard_states),
            "optimizer": _shard(optimizer_bytes, gpus, shard_states),
            "activations": activations,
            "logits": float(logits),
            "reference": objective["reference_bytes"],
            "generation_kv_cache": objective["kv_cache_bytes"],
            "cuda_context": float(CUDA_CONTEXT_BYTES),
        }
        if objective["kv_cache_bytes"]:  # generation and the training step do not overlap: the larger counts
            overlap = min(parts["generation_kv_cache"], parts["activations"] + parts["logits"])
            parts["generation_kv_cache"] -= overlap
        parts["total"] = sum(parts.values())
        return parts

    per_gpu = total_for(strategy)
    return {
        "model": config.model.pretrained or "model.init",
        "gpus": gpus,
        "strategy": strategy,
        "parameters": counts,
        "weight_dtype": weight_dtype,
        "optimizer": optim,
        "batch_per_gpu": batch,
        "sequence_length": sequence,
        "image_tokens": n_image,
        "gradient_checkpointing": use_checkpointing,
        "objective": {k: v for k, v in objective.items() if k not in ("reference_bytes", "kv_cache_bytes")},
        "per_gpu_bytes": per_gpu,
        "per_gpu_gib": {k: v / GiB for k, v in per_gpu.items()},
        "activations_gib": {"without_checkpointing": full / GiB, "with_checkpointing": checkpointed / GiB},
        "by_strategy_gib": {kind: total_for(kind)["total"] / GiB for kind in STRATEGIES},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A plain-text report: parameter counts, per-GPU breakdown, and every strategy's total."""
    counts = plan["parameters"]
    lines = [
        f"model: {plan['model']}   {plan['gpus']} GPU(s), {plan['strategy']}",
        f"parameters: {counts['total']:,} total ({counts['vision']:,} vision, {counts['projector']:,} projector, "
        f"{counts['language']:,} language); {counts['trainable']:,} trainable"
        + (f" (LoRA {counts['lora']:,})" if counts.get("lora") else ""),
        f"weights: {plan['weight_dtype']}   optimizer: {plan['optimizer']}   batch/GPU: {plan['batch_per_gpu']}   "
        f"sequence: {plan['sequence_length']} ({plan['image_tokens']} image tokens)   "
        f"gradient checkpointing: {'on' if plan['gradient_checkpointing'] else 'off'}",
        f"objective: {plan['objective']['name']}   rows per step: {plan['objective']['rows']}   "
        f"reference: {plan['objective']['reference']}",
        "",
        f"{'per GPU':<14}{'GiB':>10}",
    ]
    for name, value in plan["per_gpu_gib"].items():
        if name != "total":
            lines.append(f"{name:<14}{value:>10.2f}")
    lines.append(f"{'total':<14}{plan['per_gpu_gib']['total']:>10.2f}")
    acts = plan["activations_gib"]
    lines += [
        f"(activations: {acts['without_checkpointing']:.2f} GiB without, {acts['with_checkpointing']:.2f} GiB with "
        "gradient checkpointing)",
        "",
        f"{'strategy':<14}{'GiB per GPU':>12}",
    ]
    lines += [f"{kind:<14}{value:>12.2f}" for kind, value in plan["by_strategy_gib"].items()]
    return "\n".join(lines)
