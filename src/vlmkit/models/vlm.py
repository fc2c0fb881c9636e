"""VisionLanguageModel: vision tower -> projector -> causal LM, as one Hugging Face model.

The whole model is here. Image features replace the embeddings of the placeholder tokens
(one placeholder per image feature, expanded by the adapter); the loss is computed from the
hidden states of labelled positions only, so no vocabulary logits are built for image,
prompt or padding positions (Gemma's vocabulary is 256k).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Any, ClassVar, Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmkit.models.feature_cache import VisionFeatureCache
from vlmkit.models.loss import labelled_loss, softcapped
from vlmkit.models.projectors import PROJECTORS
from vlmkit.models.turn_isolation import block_mask
from vlmkit.models.vision import build_vision_tower, feature_dim, freeze_unused, select_features

try:  # transformers >= 5.2x declares sub-configs with their default model types
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.17 (the GPU machine's): plain classes, converted below
    SubConfigSpec = None

IGNORE_INDEX = -100


def _sub_config(value: dict | PreTrainedConfig | None, default_type: str) -> PreTrainedConfig:
    """A sub-config from its dict (what config.json holds), whatever transformers 5.x does itself."""
    if isinstance(value, PreTrainedConfig):
        return value
    fields = dict(value or {})
    return AutoConfig.for_model(fields.pop("model_type", default_type), **fields)


@strict
class VLMConfig(PreTrainedConfig):
    """Config of a VisionLanguageModel: two sub-configs plus how they are joined."""

    model_type = "vlmkit_vlm"
    if SubConfigSpec is not None:
        sub_configs_defaults: ClassVar[dict] = {
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        }
    else:  # pragma: no cover - exercised under transformers 5.17
        sub_configs: ClassVar[dict] = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector: str = "linear"
    projector_hidden_size: int | None = None
    projector_dropout: float = 0.0
    projector_kwargs: dict | None = None
    vision_feature_layer: int = -1
    vision_feature_select: Literal["cls_patch", "patch", "cls"] = "cls_patch"
    image_size: int = 224
    # Where the image goes in the first user turn. "after_text" lets image tokens attend to the
    # question (causal attention), so they can compute question-aware features themselves.
    image_placement: Literal["before_text", "after_text"] = "before_text"
    image_token_id: int | None = None
    num_image_tokens: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.vision_config = _sub_config(self.vision_config, "dinov2")
        self.text_config = _sub_config(self.text_config, "qwen2")
        super().__post_init__(**kwargs)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector {self.projector!r} is not one of {sorted(PROJECTORS)}")
        # The LM's own tying decides; the composite must agree so tied weights are saved once.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


class VisionLanguageModel(PreTrainedModel):
    config_class = VLMConfig
    config: VLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    #: liger-kernel fused linear cross-entropy for the loss (model.speed.fused_cross_entropy).
    fused_cross_entropy: bool = False
    #: per-image tower outputs for a frozen tower (model.speed.vision_feature_cache); not saved.
    vision_feature_cache: VisionFeatureCache | None = None

    def __init__(
        self,
        config: VLMConfig,
        vision_tower: nn.Module | None = None,
        language_model: nn.Module | None = None,
    ) -> None:
        """Pass `vision_tower`/`language_model` to compose already-built (e.g. pretrained) parts."""
        super().__init__(config)
        self.vision_tower = (
            vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        )
        self.language_model = (
            language_model
            if language_model is not None
            else AutoModelForCausalLM.from_config(config.text_config)
        )
        projector_class = PROJECTORS[config.projector]
        self.projector = projector_class(
            feature_dim(self.vision_tower),
            config.text_config.hidden_size,
            hidden_dim=config.projector_hidden_size,
            dropout=config.projector_dropout,
            **(config.projector_kwargs or {}),
        )
        lm_tied = getattr(self.language_model, "_tied_weights_keys", None) or {}
        if config.tie_word_embeddings and isinstance(lm_tied, dict):
            self._tied_weights_keys = {
                f"language_model.{k}": f"language_model.{v}" for k, v in lm_tied.items()
            }
        freeze_unused(self.vision_tower)
        self._no_split_modules = sorted(
            set(getattr(self.vision_tower, "_no_split_modules", None) or [])
            | set(getattr(self.language_model, "_no_split_modules", None) or [])
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- embeddings ---------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_image_tokens, text hidden size)."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        tower = functools.partial(
            select_features,
            self.vision_tower,
            layer=self.config.vision_feature_layer,
            select=self.config.vision_feature_select,
        )
        cache = self.vision_feature_cache
        features = (
            tower(pixel_values) if cache is None else cache.features(pixel_values, self.vision_tower, tower)
        )
        return self.projector(features.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions.

        `image_index[i]` names the row of `pixel_values` that sample i shows: a batch with many
        questions about one image runs the vision tower on that image once.
        """
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            if self.training and is_deepspeed_zero3_enabled():
                # ZeRO-3 gathers the tower's parameters collectively: every rank must run it every
                # step, or a text-only batch on one rank hangs the others. The zero keeps the loss.
                blank = torch.zeros(
                    1, 3, self.config.image_size, self.config.image_size, device=embeds.device
                )
                embeds = embeds + self.get_image_features(blank).sum().to(embeds.dtype) * 0.0
            return embeds
        image_mask = input_ids == self.config.image_token_id
        features = self.get_image_features(pixel_values)
        if image_index is not None:
            features = features[image_index]
        elif features.shape[0] != int(image_mask.any(dim=1).sum()):
            raise ValueError(
                f"{features.shape[0]} images for {int(image_mask.any(dim=1).sum())} rows with images"
            )
        if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{int(image_mask.sum())} image placeholder tokens for {features.shape[0]} images of "
                f"{features.shape[1]} tokens each; encode prompts with the model's adapter"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    # -- training -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_index)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._custom_mask(attention_mask, inputs_embeds.dtype)
        if labels is None:
            if past_key_values is not None:  # only when given: transformers 5.24+ renames it `cache`
                kwargs["past_key_values"] = past_key_values
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
        hidden = self.language_model.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        loss = labelled_loss(
            hidden,
            labels,
            self.get_output_embeddings(),
            softcap=getattr(self.config.text_config, "final_logit_softcapping", None),
            num_items_in_batch=num_items_in_batch,
            fused=self.fused_cross_entropy,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def _custom_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> Any:
        """A (batch, 1, q, k) boolean mask (turn isolation) in the form the LM's attention takes as-is."""
        implementation = self.language_model.config._attn_implementation or "eager"
        if implementation == "sdpa" or mask.dtype != torch.bool:
            return mask
        if implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        if implementation == "flex_attention":
            return block_mask(mask)
        raise ValueError(
            f"isolated turns need a 4D attention mask, which {implementation} attention does not take; "
            "set model.speed.attention to sdpa, eager or flex_attention, or drop data.*.turns_per_image"
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for selected hidden states, with the LM's final soft-capping (Gemma 2)."""
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        return softcapped(self.get_output_embeddings()(hidden), cap)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """The LM's own `generate` on merged embeddings; returns only the new tokens.

        Sampling k answers per prompt (`num_return_sequences` k, GRPO's groups) runs each prompt
        through the LM once and lets its k rows share that KV cache, instead of k identical
        prefills; the answers are drawn from the same distribution either way.
        """
        inputs_embeds = self.embed(input_ids, pixel_values, image_index)
        if attention_mask is not None and self._can_share_prompts(generate_kwargs):
            inputs_embeds, attention_mask, generate_kwargs = self._shared_prompt_cache(
                inputs_embeds, attention_mask, generate_kwargs
            )
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )

    def _cache_argument(self) -> str:
        """The LM's name for its KV cache (`cache` from transformers 5.24, `past_key_values` before)."""
        parameters = inspect.signature(self.language_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _can_share_prompts(self, generate_kwargs: dict[str, Any]) -> bool:
        """Several sampled answers per prompt, plain sampling with the default dynamic cache only:
        beams rank rows against each other, a caller's own cache or a static / sliding cache needs
        what `generate` builds itself."""
        config = generate_kwargs.get("generation_config")
        return (
            config is not None
            and (config.num_return_sequences or 1) > 1
            and bool(config.do_sample)
            and (config.num_beams or 1) == 1
            and config.cache_implementation in (None, "dynamic")
            and not any(key in generate_kwargs for key in ("cache", "past_key_values"))
        )

    def _shared_prompt_cache(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        generate_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Prefill each prompt but its last token once, repeat the cache `num_return_sequences`
        times per row, and hand `generate` the expanded prompt with that cache (it runs only the
        uncached last token), as transformers' own prompt-reuse recipe does. Positions follow
        `generate`'s rule for a left-padded batch (cumulative sum of the mask)."""
        from transformers import DynamicCache

        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.language_model.config)
        name = self._cache_argument()
        self.language_model(
            inputs_embeds=inputs_embeds[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
            **{name: cache},
        )
        config = copy.deepcopy(generate_kwargs["generation_config"])
        copies, config.num_return_sequences = config.num_return_sequences, 1
        cache.batch_repeat_interleave(copies)
        kwargs = {**generate_kwargs, "generation_config": config, name: cache}
        return (
            inputs_embeds.repeat_interleave(copies, dim=0),
            attention_mask.repeat_interleave(copies, dim=0),
            kwargs,
        )

    # -- freezing -----------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision_tower, "projector": self.projector, "lm": self.language_model}

    def set_trainable(self, vision: bool = True, projector: bool = True, lm: bool = True) -> None:
        for name, train in (("vision", vision), ("projector", projector), ("lm", lm)):
            self.parts()[name].requires_grad_(train)
        freeze_unused(self.vision_tower)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """A part with no trainable parameter stays in eval mode: a frozen tower's BatchNorm keeps
        its statistics and its dropout stays off, so its output is a function of the image alone
        (and `model.speed.vision_feature_cache` may keep it)."""
        super().train(mode)
        if mode:
            for part in self.parts().values():
                if not any(p.requires_grad for p in part.parameters()):
                    part.eval()
        return self


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModel` resolve `vlmkit_vlm` folders (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(VLMConfig.model_type, VLMConfig)
    for auto in (AutoModel, AutoModelForCausalLM):
        with contextlib.suppress(ValueError):
            auto.register(VLMConfig, VisionLanguageModel)
