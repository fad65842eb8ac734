"""Image-folder loading: JPEG files decoded lazily per epoch vs the one-time preprocessed cache.

Generates a folder of procedurally drawn JPEG images (--num-images, default 5,000, --source-size
pixels, two class subfolders) once under .cache/bench/, then times full passes of a DataLoader
(batch 64, num_workers 0, one torch thread: the per-image work of one worker) over
- `lazy`: ImageFolder decoding, orienting, converting and resizing every file each epoch;
- `cache`: the same items read from the memory-mapped uint8 file of `data.preprocessed_cache=true`;
alternating (ABBA), medians of images/s on --clock; the one-time cache build is timed separately
(cold: the cache file is deleted first). Items of both are checked to be identical.

    nice -n 5 python bench/folder_loading.py --quick      # 1,000 images
    nice -n 5 python bench/folder_loading.py              # 5,000 images
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from common import (
    CACHE_DIR,
    ROOT,
    alternate,
    base_parser,
    clock,
    format_table,
    machine_info,
    median,
    median_ratio,
    setup_run,
    spread,
    write_results,
)
from torch.utils.data import DataLoader

sys.path.insert(0, str(ROOT))
from ldm.data import ImageFolder
from tests.image_folders import make_class_folders


def make_folder(root: Path, num_images: int, size: int) -> Path:
    marker = root / f".complete-{num_images}-{size}"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_class_folders(
            root, per_class=num_images // 2, size=size, classes=("discs", "squares"), fmt="jpg"
        )
        marker.touch()
    return root


def epoch_seconds(dataset, clock_name: str, batch_size: int = 64) -> float:
    now = clock(clock_name)
    start = now()
    n = 0
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=0):
        n += len(batch["image"])
    assert n == len(dataset)
    return now() - start


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=None, help="default 5000 (quick: 1000)")
    parser.add_argument("--source-size", type=int, default=96, help="side of the JPEG files")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="default 4 (quick: 2)")
    args = parser.parse_args()
    setup_run(args)
    num = args.num_images or (1000 if args.quick else 5000)
    rounds = args.rounds or (2 if args.quick else 4)
    folder = make_folder(CACHE_DIR.parent / "bench" / f"folder_{num}", num, args.source_size)
    cache_dir = CACHE_DIR.parent / "bench" / f"folder_{num}_preprocessed"
    shutil.rmtree(cache_dir, ignore_errors=True)

    lazy = ImageFolder(str(folder), args.image_size, labels="folders").build()
    now = clock(args.clock)
    start = now()
    cached = ImageFolder(
        str(folder),
        args.image_size,
        labels="folders",
        preprocessed_cache=True,
        cache_dir=str(cache_dir),
    ).build()
    build = now() - start
    for i in torch.linspace(0, len(lazy) - 1, 50).long().tolist():
        a, b = lazy[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]), i

    times = alternate(
        {
            "lazy": lambda: epoch_seconds(lazy, args.clock),
            "cache": lambda: epoch_seconds(cached, args.clock),
        },
        rounds,
    )
    rows = [
        {
            "variant": "lazy JPEG decoding (per epoch)",
            "img_s": num / median(times["lazy"]),
            "seconds": median(times["lazy"]),
        },
        {
            "variant": "preprocessed cache (per epoch)",
            "img_s": num / median(times["cache"]),
            "seconds": median(times["cache"]),
        },
        {"variant": "preprocessed cache: one-time build", "img_s": num / build, "seconds": build},
    ]
    speedup = median_ratio(times["lazy"], times["cache"])
    table = format_table(
        rows, [("variant", "variant"), ("img_s", f"images/s ({args.clock})"), ("seconds", "s")]
    )
    print(
        f"{num} JPEGs {args.source_size}x{args.source_size} -> "
        f"{args.image_size}x{args.image_size}, "
        f"batch 64, num_workers 0, {args.threads} thread(s), {rounds} rounds"
    )
    print(table)
    print(
        f"cache vs lazy per epoch: {speedup:.1f}x; break-even after "
        f"{build / (median(times['lazy']) - median(times['cache'])):.2f} epochs"
    )
    path = write_results(
        "folder_loading",
        args.quick,
        {
            "machine": machine_info(),
            "settings": {
                "num_images": num,
                "source_size": args.source_size,
                "image_size": args.image_size,
                "batch_size": 64,
                "num_workers": 0,
                "threads": args.threads,
                "clock": args.clock,
                "rounds": rounds,
            },
            "rows": rows,
            "speedup": speedup,
            "times": {k: v for k, v in times.items()},
            "spread": {k: spread(v) for k, v in times.items()},
            "cache_bytes": sum(p.stat().st_size for p in cache_dir.glob("*.u8")),
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
