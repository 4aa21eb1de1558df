"""`gfnet-viz`: draw where a GFNet looks, its accuracy/Multiply-Adds curves, and benchmark results.

    gfnet-viz [patches] --checkpoint PATH --images DIR_OR_FILES... --out FILE.png
              [--thresholds INDEX|V1,V2,...|FILE] [--device cpu] [--image-size S] [--crop-pct 0.875]
              [--labels L1 L2 ...] [--class-names FILE] [--ncols 4] [--scale K]
    gfnet-viz budget SOURCE... --out FILE.png|FILE.svg [--labels NAME...] [--baseline MACS ACC]
    gfnet-viz bench RESULTS.json... --out FILE.png|DIR
    gfnet-viz latency RESULTS.json... --out FILE.png|FILE.svg [--labels NAME...]
    gfnet-viz report DEMO_DIR [--threshold-index 19] [--bench RESULTS.json...]

`patches` is the default command: `gfnet-viz --checkpoint ... --images ... --out ...` works as is.
Everything here is a call into :mod:`gfnet.viz`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from gfnet.cli._errors import parse_device, positive_int, prepare_output_dir, run_command

COMMANDS = ("patches", "budget", "bench", "report", "latency")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-viz", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("patches", help="the glance and focus patches as numbered boxes on each image (PNG)")
    s.add_argument("--checkpoint", required=True, help="a GFNet checkpoint (gfnet's or the reference's, any layout)")
    s.add_argument("--arch", default=None, help="backbone, for files that do not name it (the reference train.py's)")
    s.add_argument("--patch-size", type=int, default=None, help="patch size, for files that do not store it")
    s.add_argument("--T", type=int, default=None, help="sequence length, for files that do not store it")
    s.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    s.add_argument("--out", required=True, help="the PNG to write")
    s.add_argument("--thresholds", default=None,
                   help="exit thresholds: a budget index into the checkpoint's dynamic_threshold (0..38; 19 "
                        "= equal exit shares), comma-separated values (one per step), or a .json/.pt/.txt "
                        "file; marks the step where each image would exit")
    s.add_argument("--device", default="cpu", help="where to run the net (cpu, cuda, cuda:1, ...)")
    s.add_argument("--image-size", type=positive_int, default=None,
                   help="S (default: the checkpoint's image_size if stored, else the backbone's)")
    s.add_argument("--crop-pct", type=float, default=None,
                   help="resize the shorter side to S/crop_pct, then centre-crop S (default: the checkpoint's "
                        "crop_pct if stored, else the backbone's; 1 keeps the whole square image)")
    s.add_argument("--labels", type=int, nargs="+", default=None, help="true class per image, in file order")
    s.add_argument("--class-names", default=None, help="a text file with one class name per line (default: the "
                   "class folder names the checkpoint stores, if any)")
    s.add_argument("--ncols", type=positive_int, default=4)
    s.add_argument("--scale", type=positive_int, default=None,
                   help="PNG pixels per image pixel (default 256 // S, >= 1)")

    b = sub.add_parser("budget", help="top-1 accuracy vs Multiply-Adds from checkpoints or results JSON")
    b.add_argument("sources", nargs="+", help="checkpoints (.pth.tar) and/or results files (.json)")
    b.add_argument("--out", required=True, help=".png, .svg or .pdf")
    b.add_argument("--labels", nargs="+", default=None, help="legend name per source")
    b.add_argument("--baseline", nargs=2, type=float, metavar=("MACS", "ACC"), default=None,
                   help="the backbone alone: Multiply-Adds (raw count, or GMACs if < 100) and top-1 %%")
    b.add_argument("--title", default=None)

    c = sub.add_parser("bench", help="gfnet-bench results as a table and speedup bars, one PNG per suite")
    c.add_argument("results", nargs="+", help="bench result JSON files (bench/results/*.json)")
    c.add_argument("--out", required=True, help="a folder (<suite>.png each) or NAME.png (NAME_<suite>.png "
                                                "when there are several suites)")

    lat = sub.add_parser("latency", help="top-1 accuracy vs batch-1 latency of a deployed GFNet and its backbone "
                                         "(gfnet.deploy.latency.accuracy_latency_points results, JSON)")
    lat.add_argument("results", nargs="+", help="JSON files of AccuracyLatency.to_dict() (one or a list each)")
    lat.add_argument("--out", required=True, help=".png, .svg or .pdf")
    lat.add_argument("--labels", nargs="+", default=None, help="legend name per result")
    lat.add_argument("--title", default=None)

    r = sub.add_parser("report", help="patches.png, budget_curve.png (and accuracy_latency.png where the "
                                      "folder has latency.json) from a gfnet-demo output folder")
    r.add_argument("demo_dir")
    r.add_argument("--threshold-index", type=int, default=19)
    r.add_argument("--max-images", type=positive_int, default=8)
    r.add_argument("--bench", nargs="+", default=None, help="bench result JSON files to render too")
    return p


def _patches(args) -> int:
    from gfnet import viz
    from gfnet.checkpoint import load_checkpoint

    device = parse_device(args.device)
    net = load_checkpoint(args.checkpoint, arch=args.arch, patch_size=args.patch_size, T=args.T).to(device)
    # the evaluation geometry the checkpoint stores (image_size, crop_pct) is in net.config (the backbone's else)
    S = args.image_size or int(net.config.image_size)
    crop_pct = args.crop_pct if args.crop_pct is not None else float(net.config.crop_pct)
    images, files = viz.load_images(args.images, S, crop_pct, interpolation=net.config.dataset_interpolation)
    thresholds = (viz.read_thresholds(args.thresholds, net.meta.as_dict()) if args.thresholds is not None
                  else None)
    class_names = None
    if args.class_names:
        with open(args.class_names) as f:
            class_names = [line.strip() for line in f if line.strip()]
    elif net.meta.classes:  # the class folder names the checkpoint stores
        class_names = list(net.meta.classes)
    if args.labels is not None and len(args.labels) != len(files):
        raise ValueError(f"{len(args.labels)} labels for {len(files)} images")
    titles = [os.path.basename(f) for f in files]
    grid = viz.plot_patches(net, images, args.out, thresholds=thresholds, labels=args.labels,
                            class_names=class_names, ncols=args.ncols, scale=args.scale, titles=titles)
    print(f"{grid.path}: {len(files)} images, {grid.size[0]}x{grid.size[1]} px")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["patches"] + argv
    args = _parser().parse_args(argv)
    return run_command("gfnet-viz", lambda: _run(args))


def _writable_formats(command: str) -> dict:
    """{".ext": format name} that ``command`` can write: PIL's image formats for ``patches``, matplotlib's for
    ``budget`` (others: no restriction checked here)."""
    if command == "patches":
        from PIL import Image

        Image.init()
        return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if command == "budget":
        from matplotlib.backend_bases import FigureCanvasBase

        return {"." + ext: name for ext, name in FigureCanvasBase.get_supported_filetypes().items()}
    return {}


def _prepare_out(path: str, folder_allowed: bool = False, command: str = "") -> None:
    """Check, before the work, that ``path`` (a file to write, or for ``bench`` maybe a folder) can be
    written in a format the command writes; create its missing folders unless they would start at the
    filesystem root."""
    if folder_allowed and (os.path.isdir(path) or not os.path.splitext(path)[1]):
        prepare_output_dir(path)
        return
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder; give a file name")
    formats = _writable_formats(command)
    ext = os.path.splitext(path)[1].lower()
    if formats and ext not in formats:
        usual = ".png" if command == "patches" else ".png, .svg or .pdf"
        raise ValueError(f"--out {path}: gfnet-viz {command} cannot write "
                         + (f"'{ext}' files" if ext else "a file without an extension (the format comes from it)")
                         + f"; use {usual}")
    prepare_output_dir(os.path.dirname(os.path.abspath(path)), "--out's folder")


def _run(args) -> int:
    from gfnet import viz

    if args.command == "report":
        if not os.path.isdir(args.demo_dir):
            raise FileNotFoundError(2, "no such demo folder (gfnet-demo --out writes one)", args.demo_dir)
        prepare_output_dir(args.demo_dir, "the report folder")
    else:
        _prepare_out(args.out, folder_allowed=args.command == "bench", command=args.command)
    if args.command == "patches":
        return _patches(args)
    if args.command == "budget":
        series = viz.plot_budget_curve(args.sources, args.out, labels=args.labels,
                                       baseline=tuple(args.baseline) if args.baseline else None,
                                       title=args.title)
        print(f"{args.out}: {', '.join(s.label for s in series)}")
        return 0
    if args.command == "bench":
        for path in viz.plot_bench(args.results, args.out):
            print(path)
        return 0
    if args.command == "latency":
        data = viz.plot_accuracy_latency(args.results, args.out, labels=args.labels, title=args.title)
        print(f"{args.out}: {', '.join(d['arch'] + ' ' + d['runtime'] for d in data)}")
        return 0
    paths = viz.render_report(args.demo_dir, threshold_index=args.threshold_index,
                              max_images=args.max_images, bench=args.bench)
    for key in ("patches", "budget_curve", "accuracy_latency"):
        if paths.get(key):
            print(paths[key])
    for path in paths["bench"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
