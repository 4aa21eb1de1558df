"""What every picture of gfnet.viz shares: the step colours and the off-screen figure writer."""
from __future__ import annotations

import os
from typing import Tuple, Union

__all__ = ["STEP_COLORS", "PathLike", "hex_color", "save_figure"]

# matplotlib's tab10 as RGB bytes: step 1 (the glance) blue, then orange, green, red, purple, ...
STEP_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

PathLike = Union[str, "os.PathLike[str]"]


def hex_color(rgb: Tuple[int, int, int]) -> str:
    """(r, g, b) bytes -> "#rrggbb" for matplotlib."""
    r, g, b = rgb
    return f"#{r:02x}{g:02x}{b:02x}"


def save_figure(fig, out_path: PathLike, dpi: int) -> str:
    """Render a matplotlib ``Figure`` with the Agg canvas (``pyplot`` and the global backend are never
    touched) to ``.png``, ``.svg`` or ``.pdf`` by extension; folders are created. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_path = os.fspath(out_path)
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in (".png", ".svg", ".pdf"):
        raise ValueError(f"write .png, .svg or .pdf, got {out_path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, dpi=dpi)
    return out_path
