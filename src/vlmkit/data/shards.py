"""webdataset tar shards in the layout img2dataset writes: `KEY.jpg|png` + `KEY.txt` [+ `KEY.json`].

Reading streams shard by shard, so a LAION-sized set never has to fit in memory. A record whose
image does not decode (or that has no image or caption) is a bad sample: with `skip` it is
counted, logged and left out; with `fail` reading stops on it with its id and reason.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from vlmkit.data.images import load_image, to_rgb
from vlmkit.data.sample import Sample
from vlmkit.data.sources import DataSpec, data_spec, load_samples
from vlmkit.data.sources.captions import caption_of, caption_sample, is_caption_shaped
from vlmkit.errors import DataError, SampleError

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
BadSamplePolicy = Literal["skip", "fail"]


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DataError(
            "webdataset shards need the webdataset package; run `pip install 'vlmkit[data]'`"
        ) from None
    return webdataset


@dataclass
class ShardReadStats:
    """How many records were read and which were bad; training writes it into metrics.json."""

    read: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)  # the first few "id: reason"

    def record(self, error: SampleError) -> None:
        self.bad += 1
        if len(self.examples) < 10:
            self.examples.append(f"{error.sample_id}: {error.reason}")

    def report(self, log: logging.Logger) -> None:
        if self.bad:
            log.warning(
                "%d of %d shard record(s) were bad and skipped (first: %s)",
                self.bad,
                self.read,
                self.examples[0],
            )


# -- finding shards -------------------------------------------------------------------------------
def expand_shards(path: str | Path | Sequence[str | Path]) -> list[str]:
    """A brace pattern (`shards/{000000..000009}.tar`), a glob, a folder of .tar files, or a list."""
    from braceexpand import braceexpand

    if isinstance(path, (list, tuple)):
        return [url for item in path for url in expand_shards(item)]
    text = str(path)
    if "://" in text or text.startswith("pipe:"):
        return list(braceexpand(text))  # remote or piped: webdataset opens it, nothing to check here
    if Path(text).is_dir():
        urls = sorted(str(p) for p in Path(text).glob("*.tar"))
        if not urls:
            raise DataError(f"no .tar shards in folder {text}")
        return urls
    urls = []
    for expanded in braceexpand(text):
        matches = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
        urls.extend(matches)
    missing = [url for url in urls if not Path(url).is_file()]
    if missing or not urls:
        raise DataError(f"shard {missing[0] if missing else text} does not exist; check data.path")
    return urls


# -- reading --------------------------------------------------------------------------------------
def decode_record(record: dict[str, Any]) -> Sample:
    """One tar record (bytes per extension) -> a caption Sample with a decoded RGB image."""
    key = str(record.get("__key__", "?"))
    try:
        meta = json.loads(record["json"]) if "json" in record else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SampleError(key, "its .json is not valid JSON") from None
    if not isinstance(meta, dict):
        meta = {}
    sample_id = str(meta.pop("id", key))
    messages = meta.pop("messages", None)
    answers = meta.pop("answers", None)
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    if image_key is None:
        raise SampleError(sample_id, f"no image ({'/'.join(IMAGE_KEYS)}) in the shard record")
    try:
        with Image.open(io.BytesIO(record[image_key])) as opened:
            opened.load()
            image = to_rgb(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleError(sample_id, f"corrupt {image_key} image ({exc})") from None
    if messages:
        return Sample(id=sample_id, image=image, messages=messages, answers=answers or [], meta=meta)
    if "txt" in record:
        caption = record["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = str(meta.get("caption") or "").strip()
    if not caption:
        raise SampleError(sample_id, "no caption (.txt) in the shard record")
    alternatives = meta.pop("captions", None) or ()
    meta.pop("caption", None)  # img2dataset repeats the .txt caption in its .json
    sample = caption_sample(sample_id, image, caption, alternatives=alternatives)
    sample.meta = meta  # url, key, status, width, height, ... as img2dataset wrote them
    return sample


def _all_shards(urls: Iterable[Any]) -> Iterator[Any]:
    # webdataset's own splitters are bypassed: `iter_records` assigns shards to readers itself.
    yield from urls


@dataclass(frozen=True)
class ReaderSlot:
    """Which share of a shard set one reader gets: reader `index` of `count` (all ranks' workers)."""

    index: int = 0
    count: int = 1


def reader_slot(rank: int = 0, world_size: int = 1) -> ReaderSlot:
    """This DataLoader worker's slot among every process's workers: `rank * workers + worker`."""
    from torch.utils.data import get_worker_info

    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return ReaderSlot(index=rank * workers + worker, count=world_size * workers)


def _tar_records(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw records of these shards, in order, read one tar member at a time."""
    wds = _webdataset()
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=_all_shards, workersplitter=_all_shards, empty_check=False
    )
    return iter(dataset)


def _buffer_shuffle(records: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream within a buffer of `size` records: memory stays bounded whatever the data size."""
    buffer: list[Any] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


def iter_records(
    path: str | Path | Sequence[str | Path],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Raw records (bytes per extension), streamed: each goes to exactly one reader per pass.

    The readers are every DataLoader worker of every process (`rank` of `world_size`; the
    default, one process, is what Trainer needs: it reads on the main process and dispatches
    batches to the others). With at least as many shards as readers each reader streams whole
    shards of its own; with fewer, every reader streams them all and keeps every n-th record.
    Shards are shuffled with `seed` (the same order in every reader) and records within a
    buffer of `shuffle_buffer`.
    """
    urls = expand_shards(path)
    if shuffle_buffer:
        random.Random(seed).shuffle(urls)
    slot = reader_slot(rank, world_size)
    by_shard = len(urls) >= slot.count
    mine = urls[slot.index :: slot.count] if by_shard else urls
    records = _tar_records(mine) if mine else iter(())
    if not by_shard:
        records = (r for i, r in enumerate(records) if i % slot.count == slot.index)
    if shuffle_buffer:
        records = _buffer_shuffle(records, shuffle_buffer, random.Random(seed * 7919 + slot.index))
    try:
        yield from records
    except (OSError, ValueError, tarfile.TarError) as exc:  # a truncated or non-tar file
        raise DataError(f"could not read shards {mine[0]}...: {exc}; check the files") from None


def iter_shards(
    path: str | Path | Sequence[str | Path],
    *,
    on_bad_sample: BadSamplePolicy = "skip",
    stats: ShardReadStats | None = None,
    on_bad: Callable[[SampleError], None] | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Sample]:
    """Stream Samples from shards; bad records are counted in `stats` (and passed to `on_bad`).

    Records are decoded one at a time as they are consumed (see `iter_records` for the split).
    """
    stats = stats if stats is not None else ShardReadStats()
    records = iter_records(path, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=world_size)
    for record in records:
        stats.read += 1
        try:
            yield decode_record(record)
        except SampleError as error:
            if on_bad_sample == "fail":
                raise DataError(
                    f"{error} (or set on_bad_sample: skip to skip and count such samples)"
                ) from None
            logger.debug("skipping %s", error)
            stats.record(error)
            if on_bad is not None:
                on_bad(error)


# -- writing --------------------------------------------------------------------------------------
def _image_bytes(sample: Sample) -> tuple[str, bytes]:
    """The original file's bytes when it is a JPEG/PNG on disk (no re-encoding), else lossless PNG."""
    image = sample.image
    if image is None:
        raise SampleError(sample.id, "no image")
    try:
        decoded = load_image(image)  # also proves the file decodes
    except DataError as exc:
        raise SampleError(sample.id, str(exc)) from None
    if not isinstance(image, Image.Image):
        suffix = Path(image).suffix.lower().lstrip(".")
        if suffix in ("jpg", "jpeg", "png"):
            return ("jpg" if suffix == "jpeg" else suffix), Path(image).read_bytes()
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _record(index: int, sample: Sample) -> dict[str, Any]:
    extension, data = _image_bytes(sample)
    info: dict[str, Any] = {"id": sample.id, **sample.meta}
    if not is_caption_shaped(sample):  # keep a conversation whole; txt still holds its answer
        info["messages"] = sample.messages
        info["answers"] = sample.answers
    elif len(sample.answers) > 1:  # every reference caption, the txt one first
        info["captions"] = sample.answers
    return {
        "__key__": f"{index:09d}",  # webdataset keys may not contain dots; the id lives in .json
        extension: data,
        "txt": caption_of(sample).encode("utf-8"),
        "json": json.dumps(info, default=str).encode("utf-8"),
    }


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    shard_size: int = 1000,
    *,
    on_bad_sample: BadSamplePolicy = "skip",
) -> list[Path]:
    """Write Samples as `out_dir/000000.tar, 000001.tar, ...` with at most `shard_size` records each."""
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, not {shard_size}")
    wds = _webdataset()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    stats = ShardReadStats()
    pattern = str(out).replace("%", "%%") + "/%06d.tar"
    with wds.ShardWriter(
        pattern, maxcount=shard_size, verbose=0, post=lambda name: written.append(Path(name))
    ) as sink:
        index = 0
        for sample in samples:
            stats.read += 1
            try:
                record = _record(index, sample)
            except SampleError as error:
                if on_bad_sample == "fail":
                    raise DataError(
                        f"{error} (pass on_bad_sample='skip' to skip and count such samples)"
                    ) from None
                stats.record(error)
                continue
            sink.write(record)
            index += 1
    if index == 0:
        for path in written:  # ShardWriter opens its first shard eagerly
            path.unlink(missing_ok=True)
        raise DataError("no samples to write; check the data source")
    stats.report(logger)
    logger.info("wrote %d samples into %d shard(s) in %s", index, len(written), out)
    return written


def to_shards(data: str | DataSpec, out: str | Path, shard_size: int = 1000) -> list[Path]:
    """`vlmkit data to-shards`: read any source (e.g. `easyvqa_captions:train`) and write shards."""
    spec = data if isinstance(data, DataSpec) else data_spec(data)
    return write_shards(load_samples(spec), out, shard_size)
