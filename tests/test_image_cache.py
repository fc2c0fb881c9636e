"""The one image cache every image reader uses: LRU order, its bound, and that each reader
(vlmkit's VLM, the generic transformers adapter, the CLIP collator) decodes a file once."""

import pytest
import torch
from PIL import Image

from vlmkit.data.image_cache import ImageCache
from vlmkit.data.sample import Sample

pytest_plugins = ["tiny_families"]


def test_least_recently_used_goes_first_and_size_bounds_it():
    cache: ImageCache[int] = ImageCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2


def test_size_zero_and_decoded_images_are_never_kept():
    made = []
    off: ImageCache[int] = ImageCache(0)
    assert off.get_or_make("x.png", lambda: made.append(1) or 1) == 1
    assert off.get_or_make("x.png", lambda: made.append(1) or 1) == 1
    assert len(made) == 2 and len(off) == 0
    on: ImageCache[int] = ImageCache(4)
    picture = Image.new("RGB", (4, 4))  # no stable name: an object id could be reused later
    assert on.key(picture) is None
    on.get_or_make(picture, lambda: 1)
    assert len(on) == 0
    with pytest.raises(ValueError, match="image cache size"):
        ImageCache(-1)


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for index, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (40, 32), color).save(path)
        paths.append(str(path))
    return paths


def count_loads(monkeypatch, module) -> list[str]:
    """Every load_image call `module` makes, by source."""
    calls: list[str] = []
    original = module.load_image

    def counting(source):
        calls.append(str(source))
        return original(source)

    monkeypatch.setattr(module, "load_image", counting)
    return calls


def vqa(paths: list[str]) -> list[Sample]:
    return [Sample.vqa(f"s{i}", path, "what color is the shape?", ["red"]) for i, path in enumerate(paths)]


@pytest.mark.parametrize("size", [0, 8])
@pytest.mark.parametrize("adapter_module", ["vlm", "hf_generic"])
def test_adapters_decode_each_file_once_when_cached(
    tiny_vlm_dir, family_dirs, image_files, monkeypatch, adapter_module, size
):
    """vlmkit's VLM (pixels cached) and the generic transformers adapter (decoded images cached)."""
    import importlib

    from vlmkit.models.adapters import load_adapter

    module = importlib.import_module(f"vlmkit.models.adapters.{adapter_module}")
    folder = tiny_vlm_dir if adapter_module == "vlm" else family_dirs("qwen2_vl")
    adapter = load_adapter(folder, image_cache_size=size)
    calls = count_loads(monkeypatch, module)
    first = adapter.encode(vqa(image_files))
    second = adapter.encode(vqa(image_files))
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert len(calls) == (2 if size else 4)


@pytest.mark.parametrize("size", [0, 8])
def test_clip_collator_decodes_each_file_once_when_cached(image_files, monkeypatch, size):
    from test_clip import tiny_clip
    from vlmkit.data.sources.captions import caption_sample
    from vlmkit.train import clip as module

    collator = module.ClipCollator(tiny_clip(), cache_size=size)
    calls = count_loads(monkeypatch, module)
    samples = [caption_sample(f"c{i}", path, "a red shape") for i, path in enumerate(image_files)]
    first = collator(samples)
    second = collator(samples)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert len(calls) == (2 if size else 4)


def test_rows_showing_one_image_are_processed_once_per_batch(tiny_vlm_dir, image_files, monkeypatch):
    """GRPO's groups repeat each prompt: one image-processor pass per picture in a batch, even with
    no cache, and every row still gets it (shared through `image_index`)."""
    from vlmkit.models.adapters import load_adapter
    from vlmkit.models.adapters import vlm as module

    adapter = load_adapter(tiny_vlm_dir)
    calls = count_loads(monkeypatch, module)
    samples = vqa(image_files * 4)
    batch = adapter.encode(samples)
    assert len(calls) == 2 and batch["pixel_values"].shape[0] == 2
    assert batch["image_index"].tolist() == [0, 1] * 4
