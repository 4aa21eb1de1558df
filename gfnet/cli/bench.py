"""``gfnet-bench``: run benchmark suites, print their rows, write JSON + markdown (+ a chart) per suite.

Each suite is a module of bench/ (installed as ``gfnet.bench``) with
``run(device=None, quick=False, threads=None) -> list[gfnet.viz.bench_rows.Row]``, an optional ``NOTES``
text and ``EXTRA_COLUMNS`` (the row ``extra`` fields its markdown table shows). Every suite checks its
providers' outputs against its baseline before timing. The format is :mod:`gfnet.viz.bench_rows`, the
writer :mod:`gfnet.bench.rows`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys

from gfnet.cli._errors import UsageError, parse_device, positive_int, prepare_output_dir, run_command
from gfnet.device import gpu_settings

#: The registered suites: name -> module (a new suite, e.g. a GPU check, adds one line here).
SUITES = {
    "anytime": "gfnet.bench.bench_anytime",
    "kernels": "gfnet.bench.bench_kernels",
    "data": "gfnet.bench.bench_data",
    "budget": "gfnet.bench.bench_budget",
    "train": "gfnet.bench.bench_train",
    "eval": "gfnet.bench.bench_eval",  # distributed evaluation against the number of torchrun processes
    "latency": "gfnet.bench.bench_latency",  # batch-1 latency of a deployed GFNet in four runtimes
}


def load_suite(name: str):
    """The module of suite ``name`` (see SUITES)."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; choose from {', '.join(SUITES)} or 'all'")
    try:
        return importlib.import_module(SUITES[name])
    except ModuleNotFoundError as e:
        raise ImportError(f"suite {name!r} is not available in this installation ({e}); install gfnet with its "
                          "bench/ folder (`pip install -e .` from the repository)") from e


def run_suite(name: str, device=None, quick: bool = False, threads=None) -> list:
    """Run one suite by name and return its rows (:class:`gfnet.viz.bench_rows.Row`)."""
    return load_suite(name).run(device=device, quick=quick, threads=threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-bench", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", default=["anytime"],
                   help=f"suites to run ({', '.join(SUITES)}, or 'all'); default: anytime")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing (each suite < ~1 minute)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads for every suite (data: also loader workers); default: torch's setting")
    p.add_argument("--compile", action="store_true",
                   help="anytime, budget and train suites: also the modes eager bf16, compiled fp32 and compiled bf16 "
                        "(net.compile(); compilation timed apart)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="a keyword of the suite's run() (e.g. budget: num_images=2048, batch_size=32, arch=resnet50);"
                        " repeatable; the value is read as a Python literal where it parses as one, else as text")
    p.add_argument("--out-dir", default=None,
                   help="write <suite>_<device>.json, .md and .png here (checked writable before running)")
    p.add_argument("--note", default=None,
                   help="the machine's state, stamped on the results (e.g. '2-core CPU dev machine')")
    p.add_argument("--no-chart", action="store_true", help="with --out-dir: skip the PNG chart")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpucheck"]:  # a command of its own: checks with pass/fail, not timing rows
        from gfnet.bench.gpucheck import main as gpucheck

        return gpucheck(argv[1:])
    args = _parser().parse_args(argv)
    return run_command("gfnet-bench", lambda: _bench(args))


#: ``--set`` keywords that are counts or sizes: whole numbers >= 1 (a list of them where a suite takes several),
#: with an upper bound where one exists (budget points p, q = p / 20, 1..39). Checked before any suite runs.
_COUNTS = {"batch_size": None, "num_images": None, "repeats": None, "image_size": None, "patch_size": None,
           "T": None, "images": None, "processes": None, "points": 39}
_LISTS = ("points", "processes")


def _check_setting(key: str, value, text: str) -> None:
    if key not in _COUNTS:
        return
    values = list(value) if key in _LISTS and isinstance(value, (list, tuple)) else [value]
    high = _COUNTS[key]
    bad = not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 or (high is not None and v > high)
                            for v in values)
    if bad:
        what = f"whole numbers from 1 to {high}" if high else "a whole number >= 1"
        raise UsageError(f"--set {key}={text}: {key} must be {what}" + (" (one, or a comma list)" if key in _LISTS
                                                                           else ""))


def _settings(pairs, name: str, module) -> dict:
    """The ``--set NAME=VALUE`` pairs as keywords of ``module.run`` (checked against its signature)."""
    import ast

    accepted = set(inspect.signature(module.run).parameters) - {"device", "quick", "threads", "compile"}
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set takes NAME=VALUE, got {pair!r}")
        if key not in accepted:
            raise UsageError(f"--set {key}: suite {name!r} takes {', '.join(sorted(accepted)) or 'no settings'}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
        _check_setting(key, out[key], text)
    return out


def _bench(args) -> int:
    from gfnet.bench.common import resolve_device
    from gfnet.bench.rows import check_writable, environment

    names = list(SUITES) if args.suites == ["all"] else args.suites
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise UsageError(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)} or 'all'")
    modules = {name: load_suite(name) for name in names}  # a suite missing from this install fails before any runs
    settings = {name: _settings(args.settings, name, module) for name, module in modules.items()}
    parse_device(args.device)
    if args.out_dir:  # fail now, not after minutes of measurement
        prepare_output_dir(args.out_dir, "--out-dir")
        check_writable(args.out_dir)
    device = resolve_device(args.device)
    # Stamped once, before anything is written: results written by an earlier suite of this command must
    # not make the checkout look modified ("-dirty") to the next one.
    stamp = environment(device, note=args.note)
    with gpu_settings(tf32=None, cudnn_benchmark=True):  # this command's, restored afterwards; TF32 as torch has it
        for name, module in modules.items():
            _run_suite(args, name, module, device, stamp, settings[name])
    return 0


def _run_suite(args, name, module, device, stamp, settings) -> None:
    """Run one suite, print its rows, write its files."""
    from gfnet.bench.rows import markdown_table, write_results

    env = {**stamp, "load_average": [round(v, 2) for v in os.getloadavg()]}
    if settings:
        env["settings"] = dict(settings)
    kwargs = {"compile": True} if args.compile and "compile" in inspect.signature(module.run).parameters else {}
    kwargs.update(settings)
    rows = module.run(device=str(device), quick=args.quick, threads=args.threads, **kwargs)
    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    extra_columns = getattr(module, "EXTRA_COLUMNS", ())
    if args.json:
        print(json.dumps({"suite": name, "env": env, "rows": [r.to_dict() for r in rows]}, indent=1))
    else:
        print(f"\n== {name}: {env['device_name']}, git {env['git']} ==")
        print(markdown_table(rows, extra_columns))
    if args.out_dir:
        paths = write_results(args.out_dir, name, env, rows, extra_columns, getattr(module, "NOTES", ""))
        print(f"wrote {paths['json']} and {paths['md']}")
        if not args.no_chart:
            from gfnet.viz.bench_charts import plot_bench

            for png in plot_bench(paths["json"], os.path.splitext(paths["json"])[0] + ".png"):
                print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
