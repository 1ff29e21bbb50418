"""Write CIFAR-10/100 as Parquet files (DIR/train.parquet, DIR/test.parquet).

Why: clusters and offline machines read one self-describing file per split from a local path
or an object store, instead of each worker downloading from the CIFAR host.

    python jobs/prepare_data.py --dataset cifar10 --out DIR [--root DIR] [--no-download] [--encoding png]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from jobs.cli import OneLineParser, run_main  # noqa: E402
from rna_core.errors import ConfigError, DatasetNotFoundError  # noqa: E402

DATASETS = ("cifar10", "cifar100")
ENCODINGS = ("png", "jpeg")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="prepare_data.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--out", required=True, help="folder to write train.parquet and test.parquet into")
    p.add_argument("--root", default="./data", help="torchvision download/cache folder (default ./data)")
    p.add_argument("--no-download", action="store_true", help="use files already under --root, never download")
    p.add_argument("--encoding", default="png", help="png (lossless, default) or jpeg")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when --encoding jpeg")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; use one of {', '.join(DATASETS)}")
    if args.encoding not in ENCODINGS:
        raise ConfigError(f"unknown encoding {args.encoding!r}; use one of {', '.join(ENCODINGS)}")

    from rna_core.data.parquet import write_parquet_dataset
    from rna_core.data.torchvision_data import load_torchvision_cifar

    # Load both splits before writing anything, so a missing split leaves no new files behind.
    try:
        splits = {
            split: load_torchvision_cifar(
                args.dataset, root=args.root, train=split == "train", download=not args.no_download
            )
            for split in ("train", "test")
        }
    except DatasetNotFoundError as e:
        if not args.no_download:
            raise
        # the loader's own hint (run prepare_data.py) would send the user in a circle
        raise DatasetNotFoundError(
            f"{args.dataset} files not found under --root {args.root}; drop --no-download to fetch them, "
            f"or point --root at the folder that holds torchvision's {args.dataset} files"
        ) from e
    written = []
    for split, ds in splits.items():
        t0 = time.perf_counter()
        dest = Path(args.out) / f"{split}.parquet"
        try:
            path = write_parquet_dataset(
                dest,
                ds.images,
                ds.labels,
                ds.classes,
                name=f"{args.dataset}-{split}",
                encoding=args.encoding,
                jpeg_quality=args.jpeg_quality,
            )
        except OSError as e:  # unwritable or full --out: the user's to fix, not a bug
            raise ConfigError(f"cannot write {dest}: {e.strerror or e}; choose a writable --out") from e
        print(f"wrote {path} ({len(ds)} images, {args.encoding}, {time.perf_counter() - t0:.1f}s)")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("prepare_data.py", lambda a: (run(parse_args(a)), 0)[1], argv)


if __name__ == "__main__":
    sys.exit(main())
