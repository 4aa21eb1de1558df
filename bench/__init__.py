"""Benchmark suites of gfnet (installed as ``gfnet.bench``): each bench_<topic>.py has ``run(device, quick)``."""
