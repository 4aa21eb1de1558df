"""`gfnet-export`: write a GFNet checkpoint as a deployment package (ONNX or ExecuTorch).

    gfnet-export --checkpoint F --format onnx|executorch --out DIR [--input-dtype uint8|float32]
                 [--max-batch 64] [--overwrite] [--no-verify] [--classes FILE] [--arch A --patch-size P --T T]

The package (a folder) holds the glance, focus and classifier graphs and manifest.json (S, P, T, mean/std,
Multiply-Adds per step, the checkpoint's budget thresholds, versions, sha256 of every file); run it with
``gfnet.deploy.load(DIR).predict(images, thresholds)`` (numpy + onnxruntime for ONNX, executorch.runtime for
ExecuTorch) or evaluate it with ``gfnet-eval --package DIR``. The logic is :func:`gfnet.deploy.export`.
Written into a temporary folder and renamed at the end: a killed export leaves no half package at DIR.
Errors: one line on stderr, exit status 2 for bad arguments or input, 1 for failures at run time (a missing
exporter package says what to install).
"""
from __future__ import annotations

import argparse
import os
import sys

from gfnet.cli._errors import UsageError, positive_int, prepare_output_dir, run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--checkpoint", required=True, help="a .pth.tar checkpoint (gfnet's or the reference's)")
    p.add_argument("--format", required=True, choices=("onnx", "executorch"),
                   help="onnx: .onnx graphs for ONNX Runtime; executorch: .pte programs (XNNPACK delegate)")
    p.add_argument("--out", required=True, help="the package folder to write (must not exist, see --overwrite)")
    p.add_argument("--input-dtype", default="uint8", choices=("uint8", "float32"),
                   help="uint8: raw pixels, normalised inside the graphs (default); float32: images already "
                        "normalised with the backbone's mean/std")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="the largest batch the graphs take (ExecuTorch plans its memory for it; ONNX: any batch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --out")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the written graphs against the PyTorch model before publishing")
    p.add_argument("--classes", default=None, help="a text file with one class name per line, for the manifest")
    p.add_argument("--arch", default=None, help="backbone, for files that do not name it (the reference train.py's)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size, for files that do not store it")
    p.add_argument("--T", type=int, default=None, help="sequence length, for files that do not store it")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_command("gfnet-export", lambda: _export(args))


def _export(args) -> int:
    from gfnet.deploy.exporter import INSTALL_HINT, missing_dependencies

    if args.max_batch < 2:
        raise UsageError(f"--max-batch must be >= 2 (the graphs are traced at a batch of 2), got {args.max_batch}")
    missing = missing_dependencies(args.format)
    if missing:  # before the checkpoint is read
        raise ImportError(f"--format {args.format} needs {', '.join(missing)}: {INSTALL_HINT}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} is a file; give a folder for the package")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; choose another folder or pass --overwrite")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(2, "no such checkpoint", args.checkpoint)
    prepare_output_dir(os.path.dirname(out), "--out's folder")
    classes = None
    if args.classes:
        with open(args.classes, encoding="utf-8") as fh:
            classes = [line.strip() for line in fh if line.strip()]

    from gfnet.checkpoint import load_checkpoint
    from gfnet.deploy import export
    from gfnet.deploy.manifest import sha256_file

    net = load_checkpoint(args.checkpoint, arch=args.arch, patch_size=args.patch_size, T=args.T)
    if classes is not None and len(classes) != net.num_classes:
        raise UsageError(f"--classes {args.classes} names {len(classes)} classes; the model has {net.num_classes}")
    source = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": sha256_file(args.checkpoint)}
    manifest = export(net, out, format=args.format, input_dtype=args.input_dtype, max_batch=args.max_batch,
                      overwrite=args.overwrite, verify=not args.no_verify, classes=classes, source=source)
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    verified = manifest["verified"]
    print(f"wrote {args.out}: {args.format} package of {manifest['arch']} (S={manifest['image_size']}, "
          f"P={manifest['patch_size']}, T={manifest['T']}, {manifest['num_classes']} classes, {args.input_dtype} "
          f"input), {len(manifest['graphs'])} graphs, {size / 2**20:.1f} MB; "
          + (f"verified against PyTorch (largest difference {max(verified['max_abs_difference'].values()):.2g})"
             if verified else "not verified (--no-verify)")
          + ("" if manifest.get("dynamic_threshold") else "; no budget thresholds (the checkpoint stores none: "
             "give predict() T thresholds)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
