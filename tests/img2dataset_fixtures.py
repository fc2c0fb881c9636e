"""Shard folders written the way img2dataset writes them (webdataset output format).

Per shard `{shard:05d}.tar` holds, for each successful download, `KEY.{jpg|png|webp}`, `KEY.txt`
(the caption) and `KEY.json` (url, caption, key, status, error_message, width, height,
original_width, original_height, exif, sha256); beside it `{shard:05d}.parquet` lists every
row (failed ones too) and `{shard:05d}_stats.json` counts them. Keys are the shard id and the
row index zero-padded to 9 digits, as img2dataset's `oom_shard_count`/`oom_sample_per_shard` do.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

FORMATS = ("jpg", "png", "webp")
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def caption_for(shard: int, index: int) -> str:
    return f"photo {shard}-{index} of a {('red', 'green', 'blue')[index % 3]} thing"


def write_img2dataset(
    folder: Path, *, shards: int = 2, per_shard: int = 4, failed_every: int = 0, size: int = 16
) -> list[str]:
    """Write `shards` shards of `per_shard` rows; every `failed_every`-th row failed to download
    (in the parquet only, as img2dataset leaves it). Returns the keys written into the tars."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        rows, successes = [], 0
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                url = f"https://example.com/{shard}/{index}.jpg"
                caption = caption_for(shard, index)
                failed = failed_every and index % failed_every == failed_every - 1
                row = {
                    "url": url,
                    "caption": caption,
                    "key": key,
                    "status": "failed_to_download" if failed else "success",
                    "error_message": "HTTP Error 404: Not Found" if failed else None,
                    "width": None if failed else size,
                    "height": None if failed else size,
                    "original_width": None if failed else size * 4,
                    "original_height": None if failed else size * 3,
                    "exif": None if failed else "{}",
                    "sha256": None,
                }
                if not failed:
                    extension = FORMATS[(shard + index) % len(FORMATS)]
                    buffer = io.BytesIO()
                    color = (40 * index % 256, 80 * shard % 256, 120)
                    Image.new("RGB", (size, size), color).save(buffer, format=PIL_FORMAT[extension])
                    data = buffer.getvalue()
                    row["sha256"] = hashlib.sha256(data).hexdigest()
                    sink.write(
                        {
                            "__key__": key,
                            extension: data,
                            "txt": caption,
                            "json": json.dumps(row).encode("utf-8"),
                        }
                    )
                    keys.append(key)
                    successes += 1
                rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        stats = {
            "count": per_shard,
            "successes": successes,
            "failed_to_download": per_shard - successes,
            "failed_to_resize": 0,
            "duration": 0.1,
            "status_dict": {"success": successes, "HTTP Error 404: Not Found": per_shard - successes},
        }
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return keys
