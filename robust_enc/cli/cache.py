"""``robust-enc cache``: decode an image data set's evaluation images once into a memory-mapped cache."""

from __future__ import annotations

from typing import Any

from robust_enc.cli.common import add_data_arguments, add_file_data_arguments
from robust_enc.errors import UserError


def add_arguments(parser: Any) -> None:
    add_data_arguments(parser, default_dataset="imagenet")
    add_file_data_arguments(parser)
    parser.add_argument("--split", default="", help="data split (default: the data set's evaluation split)")
    parser.add_argument("--image-size", type=int, default=224, help="centre crop size in pixels (default 224)")
    parser.add_argument("--verify", action="store_true",
                        help="check every byte of an existing cache (images.npy and every source image against the "
                             "digests taken at build time; every use checks sizes and mtimes only); a stale cache is "
                             "rebuilt")


def run(args: Any) -> int:
    from robust_enc.cache import CachedImages
    from robust_enc.data import build_dataset, evaluation_split

    if not args.cache:
        raise UserError("robust-enc cache needs --cache DIR (the folder the decoded images go to)")
    split = args.split or evaluation_split(args.dataset)
    dataset, info = build_dataset(args.dataset, split, data_dir=args.data_dir, download=args.download,
                                  subset=args.subset, image_size=args.image_size, subset_list=args.subset_list,
                                  cache=args.cache, workers=args.workers, verify_cache=args.verify)
    assert isinstance(dataset, CachedImages)
    checked = " (every byte checked)" if args.verify else ""
    print(f"{len(dataset)} images of {info.name} ({split}) cached in {dataset.folder}{checked}; pass --cache "
          f"{args.cache} to robust-enc attack")
    return 0
