"""`gfnet-data`: write a sample ImageNet-layout tree, or index (validate and cache) a dataset split.

    gfnet-data make-sample ROOT [--classes 4] [--train-per-class 8] [--val-per-class 4]
                                [--width 500 --height 375] [--source photos|digits] [--bad-files]
    gfnet-data index ROOT [--split train --split val] [--refresh]
    gfnet-data demo-canvases ROOT [--seed 0] [--quick] [--train-images 2000]
"""
from __future__ import annotations

import argparse
import os
import sys

from gfnet.cli._errors import int_between, nonnegative_int, positive_int, run_command
from gfnet.data.index import cache_path, index_split
from gfnet.data.sample import make_sample_tree


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-sample", help="write ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG "
                                           "from photos shipped with scikit-learn (no download)")
    s.add_argument("root")
    s.add_argument("--classes", type=positive_int, default=4, help="class folders with images (default 4)")
    s.add_argument("--train-per-class", type=positive_int, default=8)
    s.add_argument("--val-per-class", type=nonnegative_int, default=4)
    s.add_argument("--width", type=positive_int, default=500, help="landscape width before a +-15%% jitter")
    s.add_argument("--height", type=positive_int, default=375)
    s.add_argument("--quality", type=int_between(1, 100), default=90,
                   help="JPEG quality, 1-100 (above 95 the files grow for little gain)")
    s.add_argument("--source", choices=("photos", "digits"), default="photos",
                   help="crops of sample photos, or upscaled 8x8 digits (a learnable 10-class task)")
    s.add_argument("--bad-files", action="store_true",
                   help="add grayscale, CMYK, PNG-named-.JPEG, empty, truncated and non-image files and an "
                        "empty class folder, as ImageNet has")
    s.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo-canvases", help="write gfnet-demo's held-out canvases (val/) and training canvases "
                                             "(train/) as PNGs, so that gfnet-eval scores a demo checkpoint")
    d.add_argument("root")
    d.add_argument("--seed", type=int, default=0, help="the demo's --seed")
    d.add_argument("--quick", action="store_true", help="the canvases of gfnet-demo --quick")
    d.add_argument("--train-images", type=positive_int, default=2000, help="training canvases to write")

    i = sub.add_parser("index", help="validate a dataset's files and cache the index (done by the loaders "
                                     "on first use; run it once ahead on a big tree)")
    i.add_argument("root")
    i.add_argument("--split", action="append", help="split folder (repeatable; default train and val)")
    i.add_argument("--refresh", action="store_true", help="validate every file again, ignoring the cache")
    i.add_argument("--cache-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("gfnet-data", lambda: _run(args))


def _run(args) -> int:
    if args.command == "demo-canvases":
        import dataclasses

        from gfnet.demo import QUICK, DemoConfig, write_canvas_tree

        config = dataclasses.replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
        counts = write_canvas_tree(args.root, config, train_images=args.train_images)
        print(f"{args.root}: {counts['train']} training and {counts['val']} held-out canvases of {config.canvas}x"
              f"{config.canvas} px in class folders 0..9 (score a demo checkpoint: gfnet-eval --checkpoint "
              f"DEMO/checkpoint.pth.tar --eval-mode 2 --data {args.root})")
        return 0
    if args.command == "make-sample":
        # a non-empty root is refused (FileExistsError): one line and exit status 2, by run_command
        tree = make_sample_tree(args.root, num_classes=args.classes, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, photo_size=(args.width, args.height),
                                quality=args.quality, source=args.source, bad_files=args.bad_files,
                                seed=args.seed)
        for split, files in tree.files.items():
            bad = sum(not f.valid for f in files)
            print(f"{args.root}/{split}: {len(files)} files in {len(tree.classes)} class folders"
                  + (f" ({bad} broken on purpose)" if bad else ""))
        return 0
    status = 0
    for split in args.split or ["train", "val"]:
        try:
            index = index_split(args.root, split, cache_dir=args.cache_dir, refresh=args.refresh)
        except (FileNotFoundError, ValueError) as exc:
            print(f"gfnet-data: error: {exc}", file=sys.stderr)
            status = 2  # bad input (a missing or empty split), as run_command says
            if not os.path.isdir(args.root):
                break
            continue
        print(f"{index.split_dir}: {len(index.classes)} classes, {len(index.files)} valid images, "
              f"{len(index.skipped)} skipped, {len(index.empty_classes)} empty class folders; "
              f"cache {cache_path(index.split_dir, args.cache_dir)}")
        for path, reason in index.skipped:
            print(f"  skipped {path}: {reason}")
        for cname in index.empty_classes:
            print(f"  empty class folder {cname}")
    return status


if __name__ == "__main__":
    sys.exit(main())
