"""Pictures of a GFNet at work: where it looks, what it buys, and how fast it runs.

One module per kind of picture, each function writing one file (or one per benchmark suite):

- :mod:`gfnet.viz.patches`: :func:`plot_patches`, the glance and each focus patch as numbered boxes on
  every image, with the prediction after each step and the exit step under given thresholds;
- :mod:`gfnet.viz.curves`: :func:`plot_budget_curve`, top-1 accuracy against Multiply-Adds (budgeted
  curve, anytime points, the backbone alone);
- :mod:`gfnet.viz.latency`: :func:`plot_accuracy_latency`, top-1 accuracy against batch-1 latency (a deployed
  GFNet's budgets and the backbone alone, from :func:`gfnet.deploy.latency.accuracy_latency_points`);
- :mod:`gfnet.viz.bench_charts`: :func:`plot_bench`, ``gfnet-bench`` rows as a table and speed-up bars;
- :mod:`gfnet.viz.report`: :func:`render_report`, the first two from a ``gfnet-demo`` folder, whose file
  names it defines;
- :mod:`gfnet.viz.inputs`: image files (the data loaders' validation transform) and exit thresholds.

Everything renders off-screen: matplotlib through its object-oriented API and the Agg canvas, the patch
grid through Pillow.
"""
from gfnet.data import IMAGENET_MEAN, IMAGENET_STD
from gfnet.viz.bench_charts import plot_bench, read_rows
from gfnet.viz.curves import BudgetSeries, budget_series, plot_budget_curve
from gfnet.viz.inputs import budget_thresholds, image_files, load_images, read_thresholds
from gfnet.viz.latency import plot_accuracy_latency, read_accuracy_latency
from gfnet.viz.patches import PatchGrid, denormalize, exit_steps, patch_boxes, plot_patches
from gfnet.viz.report import render_report
from gfnet.viz.style import STEP_COLORS

__all__ = ["STEP_COLORS", "IMAGENET_MEAN", "IMAGENET_STD", "patch_boxes", "exit_steps", "denormalize",
           "budget_thresholds", "read_thresholds", "image_files", "load_images", "PatchGrid", "plot_patches",
           "BudgetSeries", "budget_series", "plot_budget_curve", "read_rows", "plot_bench", "render_report",
           "plot_accuracy_latency", "read_accuracy_latency"]
