"""Seed-shaped models with random weights, built twice over the same parameters: once as the
transformers reference (the family's own class and forward, as shared/anchors/hf_baselines.py
builds it) and once as vlmkit runs it (its own VLM for seed 000; the same transformers model with
vlmkit's levers for PaliGemma and Qwen2-VL). Shared by train_speed.py and gen_speed.py.

Shapes, batch sizes and sequence layouts are hf_baselines.py's. `tiny` shrinks every width and
depth (CPU smoke test) but keeps large vocabularies, where the logits memory lives.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from vlmkit.config import SpeedSpec

PEAK_FLOPS = 798e12  # bf16 dense matmul, H100 SXM (the anchors' measured figure)
FLOP_FORMULA = (
    "MFU = 6 * N * T / step_time / 798e12; N = every parameter of the model (trainable and frozen, "
    "tied weights once, 4-bit weights counted as their bf16 originals), T = batch * LM sequence length "
    "(image + text tokens). Attention-score FLOPs are not counted; for frozen/LoRA variants 6N over-counts "
    "(no weight gradients), so only the full fine-tune figure is a true utilisation."
)
CASES = (
    "seed000_full",
    "seed000_projector",
    "seed002_lora",
    "seed002_qlora",
    "seed003_lora",
    "seed003_full",
)


@dataclass
class Built:
    """One case: the reference forward, vlmkit's model, and a batch maker over the same weights."""

    case: str
    variant: str
    batch_size: int
    ref_model: nn.Module  # what the reference optimiser updates (its parameters)
    ref_forward: Callable[..., Any]  # the family's own forward (full logits, transformers' loss)
    vlmkit_model: nn.Module  # what vlmkit's Trainer step runs (levers applied)
    make_batch: Callable[..., dict[str, Any]]  # (batch, prompt_only=False) -> tensors (+ image_keys)
    counts: dict[str, int]  # parameters per component (vision / proj / lm), bf16-equivalent
    speed: SpeedSpec
    model_name: str
    notes: list[str] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def component(name: str) -> str:
    if "multi_modal_projector" in name or "visual.merger" in name or name.startswith("projector"):
        return "proj"
    if "vision_tower" in name or "visual." in name:
        return "vision"
    return "lm"


def count_params(model: nn.Module) -> dict[str, int]:
    """Unique parameters per component; packed 4-bit storage counted as the bf16 weight it holds."""
    totals = {"vision": 0, "proj": 0, "lm": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        totals[component(name)] += n
    return totals


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )


def build(cls: type, config: Any, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random init straight on `dev`; sdpa attention, or eager where the family refuses sdpa
    (Gemma 2 with attention soft-capping)."""
    with torch.device(dev):
        try:
            return cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
        except ValueError:
            return cls._from_config(config, dtype=dtype, attn_implementation="eager")


def side_kernels(ref_model: nn.Module, requested: str | None) -> dict[str, str | None]:
    """The LM attention kernel of each side: the reference keeps the family's default; vlmkit runs
    `requested` (model.speed.attention) or what its adapters run (never a kernel that drops Gemma
    2's attention soft-capping, which transformers 5.17 allows)."""
    from vlmkit.models.attention import faithful_kernel, language_model_attention

    reference = language_model_attention(ref_model)
    return {"reference": reference, "vlmkit": faithful_kernel(ref_model, requested or reference)}


def kernel_notes(ref_model: nn.Module, kernels: dict[str, str | None]) -> list[str]:
    from vlmkit.models.attention import drops_capping

    if not drops_capping(ref_model, kernels["reference"]):
        return []
    return [
        f"the reference runs {kernels['reference']}, which this transformers lets Gemma 2 use although it "
        "drops the attention soft-capping (as the anchors ran); vlmkit keeps the capping"
    ]


def use_kernel(ref_model: nn.Module, kernels: dict[str, str | None], side: str) -> None:
    """Switch the shared LM modules to `side`'s kernel (both sides share them and their config)."""
    from vlmkit.models.attention import language_model_attention, set_attention

    kernel = kernels[side]
    if kernel is not None and language_model_attention(ref_model) != kernel:
        set_attention(ref_model, kernel, keep_capping=side == "vlmkit")


def family_forward(model: nn.Module) -> Callable[..., Any]:
    """The transformers class's own forward, bypassing vlmkit's instance-level loss patch.

    peft injects LoRA layers in place, so the base model's class forward is the LoRA model's.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return functools.partial(type(base).forward, base)


def apply_levers(model: nn.Module, speed: SpeedSpec) -> None:
    from types import SimpleNamespace

    from vlmkit.train.levers import apply_speed

    apply_speed(SimpleNamespace(model=model), speed)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- seed 000
def seed000_configs(tiny: bool) -> tuple[Any, Any]:
    """DINOv2-base and Gemma2-2B configs (or tiny ones of the same families), random-init shapes."""
    from transformers import Dinov2Config, Gemma2Config

    if tiny:
        v = Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56
        )
        t = Gemma2Config(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            final_logit_softcapping=None,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    else:
        v = Dinov2Config(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            mlp_ratio=4,
            patch_size=14,
            image_size=224,
        )
        t = Gemma2Config(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    return v, t


def seed000(variant: str, tiny: bool, dev: torch.device, dtype: torch.dtype, speed: SpeedSpec) -> Built:
    """LLaVA class with DINOv2-base + Gemma2-2B (reference) vs vlmkit's VisionLanguageModel on the
    same modules: its `mlp` projector is LLaVA's two linears, its feature layer is LLaVA's -1."""
    from transformers import Gemma2ForCausalLM, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from vlmkit.models.vlm import VisionLanguageModel, VLMConfig

    v, t = seed000_configs(tiny)
    n_text, bs = (16, 2) if tiny else (64, 6)
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    img_tok = 7
    cfg = LlavaConfig(
        vision_config=v,
        text_config=t,
        image_token_index=img_tok,
        image_seq_length=n_img,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    ref = build(Llava, cfg, dev, dtype)
    vcfg = VLMConfig(
        vision_config=v.to_dict(),
        text_config=t.to_dict(),
        projector="mlp",
        projector_hidden_size=t.hidden_size,
        vision_feature_layer=v.num_hidden_layers,  # = LLaVA's hidden_states[-1] (before the final norm)
        vision_feature_select="cls_patch",
        image_size=v.image_size,
        image_token_id=img_tok,
        num_image_tokens=n_img,
    )
    with torch.device("meta"):
        lm = Gemma2ForCausalLM(t)
    lm.model = ref.model.language_model
    lm.lm_head = ref.lm_head
    vlm = VisionLanguageModel(vcfg, vision_tower=ref.model.vision_tower, language_model=lm)
    vlm.projector.net[1] = ref.model.multi_modal_projector.linear_1
    vlm.projector.net[3] = ref.model.multi_modal_projector.linear_2
    vlm.to(device=dev)
    if variant == "projector":
        for name, p in ref.named_parameters():
            p.requires_grad_(component(name) == "proj")
        speed = speed.model_copy(update={"vision_feature_cache": True})
    apply_levers(vlm, speed)
    V = t.vocab_size
    n_prompt = n_text - n_text // 4

    def make_batch(b: int, prompt_only: bool = False) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        nt = n_prompt if prompt_only else n_text
        text = torch.randint(100, V - 100, (b, nt), generator=g)
        text[:, 0] = 2
        ids = torch.cat([torch.full((b, n_img), img_tok), text], 1)
        labels = ids.clone()
        labels[:, : n_img + n_prompt] = -100
        pixels = torch.randn(b, 3, v.image_size, v.image_size, generator=g).to(dtype)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": pixels,
            "image_keys": [f"image-{i}" for i in range(b)],
        }

    notes = [
        "vlmkit model = VisionLanguageModel sharing the LLaVA model's tower, LM and projector weights "
        "(mlp projector = LLaVA's linear_1/gelu/linear_2; feature layer = LLaVA's hidden_states[-1])",
        "Gemma 2 final_logit_softcapping is off in both: LLaVA's head never applies it (vlmkit's does), so "
        "with it on the two would compute different functions",
    ]
    if variant == "projector":
        notes.append(
            "vlmkit runs with model.speed.vision_feature_cache: timed steps see cached tower features "
            "(epoch >= 2); the first epoch costs what it costs without the cache"
        )
    return Built(
        "seed000",
        "full_ft" if variant == "full" else "projector_only",
        bs,
        ref,
        family_forward(ref),
        vlm,
        make_batch,
        count_params(ref),
        speed,
        "DINOv2-base + Gemma2-2B (LlavaForConditionalGeneration vs vlmkit VisionLanguageModel)",
        notes,
    )


# ----------------------------------------------------------------------------------------- seed 002
def seed002(variant: str, tiny: bool, dev: torch.device, dtype: torch.dtype, speed: SpeedSpec) -> Built:
    """PaliGemma-3B-224 shapes, LoRA r8 on a bf16 base or QLoRA (nf4) on the same random weights."""
    from peft import get_peft_model
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    if tiny:
        v = dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=56,
            vision_use_head=False,
        )
        t = dict(
            model_type="gemma",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=32064,
        )
        img_tok, V, hid, n_text, bs = 32000, 32064, 64, 12, 2
    else:
        v = dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            vision_use_head=False,
            projection_dim=2048,
            hidden_act="gelu_pytorch_tanh",
        )
        t = dict(
            model_type="gemma",
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=257216,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
        img_tok, V, hid, n_text, bs = 257152, 257216, 2048, 48, 2
    cfg = PaliGemmaConfig(
        vision_config=v,
        text_config=t,
        image_token_index=img_tok,
        vocab_size=V,
        projection_dim=hid,
        hidden_size=hid,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    n_suffix = max(2, n_text // 5)
    n_prefix = n_text - n_suffix
    model = build(PaliGemmaForConditionalGeneration, cfg, dev, dtype)
    counts = count_params(model)
    notes: list[str] = []
    tmpdir = None
    if variant == "qlora":
        from transformers import BitsAndBytesConfig

        tmpdir = tempfile.mkdtemp(prefix="pg_random_")
        model.save_pretrained(tmpdir)
        del model
        free()
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            tmpdir,
            quantization_config=qc,
            dtype=dtype,
            attn_implementation="sdpa",
            device_map={"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"},
        )
        notes.append(
            "4-bit model built as hf_baselines does (no prepare_model_for_kbit_training); vlmkit's own "
            "QLoRA recipe also turns on gradient checkpointing, a memory lever measured separately"
        )
    model = get_peft_model(model, lora_config())
    apply_levers(model, speed)

    def make_batch(b: int, prompt_only: bool = False) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        nt = n_prefix if prompt_only else n_text
        text = torch.randint(300, min(V, img_tok) - 10, (b, nt), generator=g)
        text[:, 0] = 2
        text[:, n_prefix - 1] = 108
        ids = torch.cat([torch.full((b, n_img), img_tok), text], 1)
        token_types = torch.zeros_like(ids)
        token_types[:, n_img + n_prefix :] = 1
        labels = ids.clone()
        labels[:, : n_img + n_prefix] = -100
        pixels = torch.randn(b, 3, v["image_size"], v["image_size"], generator=g).to(dtype)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": token_types,
            "labels": labels,
            "pixel_values": pixels,
        }

    notes.append("vlmkit = the same peft model with model.speed levers; reference = the class's own forward")
    return Built(
        "seed002",
        "qlora_nf4_r8" if variant == "qlora" else "lora_r8_bf16",
        bs,
        model,
        family_forward(model),
        model,
        make_batch,
        counts,
        speed,
        "PaliGemmaForConditionalGeneration (paligemma-3b-pt-224 shapes)",
        notes,
        cleanup=(lambda: shutil.rmtree(tmpdir, ignore_errors=True)) if tmpdir else None,
    )


# ----------------------------------------------------------------------------------------- seed 003
def qwen_pixels(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's pixel_values / image_grid_thw as the Qwen2-VL image processor makes them."""
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    g = np.random.default_rng(0)
    image = (g.random((side, side, 3)) * 255).astype("uint8")
    out = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def seed003(variant: str, tiny: bool, dev: torch.device, dtype: torch.dtype, speed: SpeedSpec) -> Built:
    """Qwen2-VL-2B shapes, one 448 px image (256 merged tokens) + 64 text tokens; LoRA r8 or full."""
    from peft import get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if tiny:
        vis = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=4,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        txt = dict(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            rope_theta=1e6,
        )
        side, n_text, bs = 56, 16, 2
    else:
        vis = dict(
            depth=32,
            embed_dim=1280,
            hidden_size=1536,
            mlp_ratio=4,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
        )
        txt = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            rope_theta=1e6,
            bos_token_id=151643,
            eos_token_id=151645,
        )
        side, n_text, bs = 448, 64, 4
    cfg = Qwen2VLConfig(
        vision_config=vis,
        text_config=txt,
        tie_word_embeddings=True,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    IMG, VS, VE, IMS, IME = 151655, 151652, 151653, 151644, 151645
    pv1, thw1 = qwen_pixels(side)
    n_img = int(thw1.prod()) // 4
    n_answer = max(2, n_text // 8)
    n_prompt = n_text - n_answer
    model = build(Qwen2VLForConditionalGeneration, cfg, dev, dtype)
    counts = count_params(model)
    if variant == "lora":
        model = get_peft_model(model, lora_config())
    apply_levers(model, speed)

    def make_batch(b: int, prompt_only: bool = False) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        nt = n_prompt if prompt_only else n_text
        text = torch.randint(1000, 150000, (b, nt), generator=g)
        text[:, 0] = IMS
        text[:, 2] = VS
        head, tail = text[:, :3], text[:, 3:]
        tail[:, 0] = VE
        tail[:, n_prompt - 3 - 4] = IME
        tail[:, n_prompt - 3 - 2] = IMS
        ids = torch.cat([head, torch.full((b, n_img), IMG), tail], 1)
        labels = ids.clone()
        labels[:, : n_img + n_prompt] = -100
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IMG).long(),
            "labels": labels,
            "pixel_values": torch.cat([pv1] * b, 0).to(dtype),
            "image_grid_thw": torch.cat([thw1] * b, 0),
        }

    return Built(
        "seed003",
        "lora_r8_bf16" if variant == "lora" else "full_ft",
        bs,
        model,
        family_forward(model),
        model,
        make_batch,
        counts,
        speed,
        "Qwen2VLForConditionalGeneration (Qwen2-VL-2B shapes, 448 px)",
        ["vlmkit = the same model with model.speed levers; reference = the class's own forward"],
    )


BUILDERS: dict[str, Callable[..., Built]] = {
    "seed000_full": functools.partial(seed000, "full"),
    "seed000_projector": functools.partial(seed000, "projector"),
    "seed002_lora": functools.partial(seed002, "lora"),
    "seed002_qlora": functools.partial(seed002, "qlora"),
    "seed003_lora": functools.partial(seed003, "lora"),
    "seed003_full": functools.partial(seed003, "full"),
}


# ----------------------------------------------------------------------------------------- reporting
def add_device_arguments(ap: Any, results_name: str) -> None:
    """--device, --dtype and --out, shared by the speed benchmarks."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument(
        "--out", default=None, help=f"JSON path (default benchmarks/results/{results_name}[_tiny].json)"
    )


def device_and_dtype(args: Any) -> tuple[torch.device, torch.dtype]:
    """The device (cuda means cuda:0) and dtype (bf16 on CUDA, fp32 elsewhere unless --dtype)."""
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    return dev, dtype


def quiet_offline_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


def environment(dev: torch.device) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    for name in ("bitsandbytes", "liger_kernel", "triton"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "installed")
        except Exception as exc:
            versions[name] = f"unavailable ({type(exc).__name__})"
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(dev),
        "omp_num_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        machine.update(
            gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine,
        "versions": versions,
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
