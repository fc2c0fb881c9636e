"""The adapter's token cache: same batches as without it, templates rendered once per sample."""

import dataclasses

import torch

from vlmkit.models.adapters import vlm as vlm_adapter
from vlmkit.models.adapters.vlm import VLMAdapter


def test_token_cache_gives_identical_batches_and_renders_each_sample_once(
    tiny_vlm_dir, easyvqa_samples, monkeypatch
):
    plain = VLMAdapter.load(tiny_vlm_dir)
    cached = VLMAdapter.load(tiny_vlm_dir, token_cache=True)
    renders = []
    original = vlm_adapter.encode_chat
    monkeypatch.setattr(vlm_adapter, "encode_chat", lambda *a, **k: renders.append(1) or original(*a, **k))
    samples = easyvqa_samples[:8]
    for train in (True, False):
        expected = plain.encode(samples, train=train)
        renders.clear()
        for _ in range(3):
            got = cached.encode(samples, train=train)
            assert got.keys() == expected.keys()
            for key in expected:
                assert torch.equal(got[key], expected[key]), key
        assert len(renders) == len(samples)  # rendered on the first pass only


def test_token_cache_re_encodes_a_changed_conversation(tiny_vlm_dir, easyvqa_samples):
    cached = VLMAdapter.load(tiny_vlm_dir, token_cache=True)
    sample = easyvqa_samples[0]
    first = cached.encode([sample])["labels"]
    other = "yes" if sample.answers[0] != "yes" else "no"
    changed = dataclasses.replace(
        sample, messages=[sample.messages[0], {"role": "assistant", "content": other}]
    )
    assert not torch.equal(cached.encode([changed])["labels"], first)
    assert torch.equal(
        cached.encode([changed])["labels"], VLMAdapter.load(tiny_vlm_dir).encode([changed])["labels"]
    )
