"""``gfnet-bench``: run benchmark suites, print a table, write JSON (and a chart where gfnet.viz can).

Each suite is a module of bench/ (installed as ``gfnet.bench``) with ``run(device=None, quick=False)``
returning result rows (dicts stamped with the device, versions and git revision).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from gfnet.cli._errors import UsageError, parse_device, prepare_output_dir, run_command

SUITES = {
    "anytime": "gfnet.bench.bench_anytime",
    "kernels": "gfnet.bench.bench_kernels",
    "data": "gfnet.bench.bench_data",
    "budget": "gfnet.bench.bench_budget",
    "train": "gfnet.bench.bench_train",
    "eval": "gfnet.bench.bench_eval",  # distributed evaluation against the number of torchrun processes
}

# Columns shown first when present; the JSON keeps every field.
_COLUMNS = ["backbone", "op", "pipeline", "budget", "stage", "provider", "batch", "dtype", "median_s", "iqr_s",
            "images_per_s", "patches_per_s", "gbytes_per_s", "speedup_vs_reference", "speedup"]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the rows' common columns."""
    if not rows:
        return "(no rows)"
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_suite(name: str, device=None, quick=False) -> list[dict]:
    """Run one suite by name (see SUITES) and return its rows."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; choose from {', '.join(SUITES)} or 'all'")
    try:
        module = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as e:
        raise ImportError(f"suite {name!r} is not available in this installation ({e})") from e
    return module.run(device=device, quick=quick)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpucheck"]:  # a command of its own: checks with pass/fail, not timing rows
        from gfnet.bench.gpucheck import main as gpucheck

        return gpucheck(argv[1:])
    parser = argparse.ArgumentParser(prog="gfnet-bench", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=["anytime"],
                        help=f"suites to run ({', '.join(SUITES)}, or 'all'); default: anytime")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter timing (smoke run)")
    parser.add_argument("--out-dir", default=None,
                        help="write <suite>_<device>.json (and a PNG chart) here; default: print only")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    return run_command("gfnet-bench", lambda: _bench(args))


def _bench(args) -> int:
    suites = list(SUITES) if args.suites == ["all"] else args.suites
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise UsageError(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)} or 'all'")
    parse_device(args.device)
    if args.out_dir:  # before the suites run: a bad --out-dir must not cost a whole benchmark
        prepare_output_dir(args.out_dir, "--out-dir")
    for name in suites:
        rows = run_suite(name, device=args.device, quick=args.quick)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"\n== {name} ({rows[0]['device'] if rows else '?'}) ==")
            print(format_table(rows))
        if args.out_dir:
            tag = rows[0].get("device_type", "cpu") if rows else "cpu"
            path = os.path.join(args.out_dir, f"{name}_{tag}.json")
            _write_json(rows, path)
            print(f"wrote {path}")
            try:
                from gfnet.viz import plot_bench
            except ImportError:
                continue
            png = os.path.splitext(path)[0] + ".png"
            plot_bench(rows, png)
            print(f"wrote {png}")
    return 0


def _write_json(rows: list, path: str) -> None:
    # Through a temporary file named as gfnet.checkpoint.atomic_save names its own (so that a later save
    # removes it if this process is killed): a full disk leaves the previous results, not half a file.
    from gfnet.checkpoint import _host_tag, remove_stale_temps

    folder, name = os.path.split(os.path.abspath(path))
    remove_stale_temps(folder)
    tmp = os.path.join(folder, f".{name}.{_host_tag()}-{os.getpid()}.json.gfnet-tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
