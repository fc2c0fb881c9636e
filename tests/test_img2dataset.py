"""img2dataset shard folders as img2dataset writes them: read, streamed lazily, split across readers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import vlmkit.data.shards as shards
from img2dataset_fixtures import caption_for, write_img2dataset
from vlmkit.data.shards import iter_records, iter_shards
from vlmkit.data.sources import load_samples
from vlmkit.data.sources.captions import caption_of


def test_img2dataset_records_read_with_their_json(tmp_path):
    keys = write_img2dataset(tmp_path / "laion", shards=2, per_shard=5, failed_every=4)
    assert len(keys) == 8  # 2 of 10 rows failed: only in the parquet, as img2dataset leaves them
    samples = load_samples({"source": "webdataset", "path": str(tmp_path / "laion")})
    assert [s.id for s in samples] == keys
    first = samples[0]
    assert caption_of(first) == caption_for(0, 0) and first.answers == [caption_for(0, 0)]
    assert first.meta["url"] == "https://example.com/0/0.jpg" and first.meta["status"] == "success"
    assert first.meta["original_width"] == 64 and "caption" not in first.meta
    assert {s.image.size for s in samples} == {(16, 16)}  # jpg, png and webp all decode


def test_caption_is_taken_from_json_when_txt_is_missing(tmp_path):
    import webdataset as wds

    write_img2dataset(tmp_path / "src", shards=1, per_shard=1)
    [record] = list(iter_records(str(tmp_path / "src")))
    del record["txt"]
    with wds.TarWriter(str(tmp_path / "no-txt.tar")) as sink:
        sink.write({k: v for k, v in record.items() if not k.startswith("__") or k == "__key__"})
    [sample] = iter_shards(str(tmp_path / "no-txt.tar"))
    assert caption_of(sample) == caption_for(0, 0)


def test_streaming_reads_lazily_with_a_bounded_buffer(tmp_path, monkeypatch):
    write_img2dataset(tmp_path / "laion", shards=3, per_shard=20)
    pulled = []
    original = shards._tar_records

    def counting(urls):
        for record in original(urls):
            pulled.append(record["__key__"])
            yield record

    monkeypatch.setattr(shards, "_tar_records", counting)
    stream = iter_shards(str(tmp_path / "laion"), shuffle_buffer=5, seed=1)
    next(stream)
    assert len(pulled) == 6  # the buffer filled, plus the one that displaced the sample yielded
    rest = list(stream)
    assert len(rest) == 59 and len(pulled) == 60


def simulated_readers(path, world_size, workers, monkeypatch, **kwargs):
    """What each (rank, worker) reads in one pass, with torch's worker info faked per reader."""
    import torch.utils.data

    seen = {}
    for rank in range(world_size):
        for worker in range(workers):
            info = SimpleNamespace(num_workers=workers, id=worker)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            seen[rank, worker] = [s.id for s in iter_shards(path, rank=rank, world_size=world_size, **kwargs)]
    return seen


@pytest.mark.parametrize("n_shards", [6, 2])  # whole shards per reader / every 4th record of all
@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_two_workers_on_two_ranks_see_each_sample_once(tmp_path, monkeypatch, n_shards, shuffle_buffer):
    keys = write_img2dataset(tmp_path / "laion", shards=n_shards, per_shard=6)
    seen = simulated_readers(
        str(tmp_path / "laion"), 2, 2, monkeypatch, shuffle_buffer=shuffle_buffer, seed=3
    )
    assert all(seen.values())  # every reader gets work
    everything = [key for ids in seen.values() for key in ids]
    assert sorted(everything) == sorted(keys)  # each sample exactly once per pass


def test_shard_stats_and_parquet_beside_tars_are_not_shards(tmp_path):
    write_img2dataset(tmp_path / "laion", shards=2, per_shard=2)
    assert json.loads((tmp_path / "laion" / "00000_stats.json").read_text())["successes"] == 2
    assert shards.expand_shards(str(tmp_path / "laion")) == [
        str(tmp_path / "laion" / "00000.tar"),
        str(tmp_path / "laion" / "00001.tar"),
    ]
    assert len(shards.expand_shards(str(tmp_path / "laion" / "{00000..00001}.tar"))) == 2


def test_clip_trains_on_img2dataset_shards(tmp_path):
    from test_clip import write_config
    from vlmkit.train.clip import load_clip_config, train_clip

    write_img2dataset(tmp_path / "laion", shards=2, per_shard=6)
    data = {"train": {"source": "webdataset", "path": str(tmp_path / "laion")}, "shuffle_buffer": 4}
    config = load_clip_config(
        write_config(tmp_path, data=data), ["training.max_steps=2", "zeroshot.tasks=[]"]
    )
    run = train_clip(config)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["bad_samples"] == 0


def test_eval_streams_shards_a_batch_at_a_time(tmp_path, monkeypatch, tiny_vlm_dir):
    """`vlmkit eval` on a shard folder holds one batch of decoded samples, not the folder."""
    from vlmkit.eval.runner import evaluate
    from vlmkit.models.adapters import load_adapter

    keys = write_img2dataset(tmp_path / "laion", shards=3, per_shard=8)
    adapter = load_adapter(tiny_vlm_dir, device="cpu")
    decoded, seen_at_generate = [], []
    original_decode, original_generate = shards.decode_record, adapter.generate

    def counting_decode(record):
        decoded.append(record["__key__"])
        return original_decode(record)

    def recording_generate(batch, **kwargs):
        seen_at_generate.append((len(decoded), len(batch)))
        return original_generate(batch, **kwargs)

    monkeypatch.setattr(shards, "decode_record", counting_decode)
    monkeypatch.setattr(adapter, "generate", recording_generate)
    spec = {"source": "webdataset", "split": "test", "path": str(tmp_path / "laion")}
    summary = evaluate(adapter, spec, tmp_path / "ev", batch_size=5, report=False)
    # each batch was generated when only it (and one sample read ahead to start) was decoded
    assert [n for n, _ in seen_at_generate] == [5, 10, 15, 20, 24]
    assert summary["n"] == summary["n_samples"] == len(keys) == 24
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == keys
    # resumed: the predicted ids are skipped while streaming, nothing is generated again
    seen_at_generate.clear()
    again = evaluate(adapter, spec, tmp_path / "ev", batch_size=5, report=False, limit=10)
    assert seen_at_generate == [] and again["n"] == 10
