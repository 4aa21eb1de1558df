"""Pictures of a GFNet at work: where it looks, what it buys, and how fast it runs.

Three pictures, each a function that writes one file (or one per benchmark suite):

- :func:`plot_patches`: for every image, the glance and each focus patch drawn on the full image as
  numbered boxes, the prediction and confidence after each step, and the step at which the image would
  exit under given thresholds (GFNet, Section 3 and Figure 1; the reference's README promised this and
  never shipped it). A grid of images in one PNG.
- :func:`plot_budget_curve`: top-1 accuracy against Multiply-Adds, as in the paper's main figure: the
  budgeted batch classification curve, the anytime points (one per step) and the backbone alone.
- :func:`plot_bench`: ``gfnet-bench`` result rows as a table and a bar chart of speedups over the
  baseline row of the same case, one PNG per suite.

:func:`render_report` makes the first two from a ``gfnet-demo`` output folder (and the third from given
benchmark files). Everything renders off-screen: matplotlib is used through its object-oriented API with
the Agg canvas (``pyplot`` and the global backend are never touched), the patch grid through Pillow.

Geometry of :func:`plot_patches` (so that a test, or a person, can find any pixel):

- Image ``i`` (0-based) is drawn at native resolution scaled by an integer factor ``k`` (nearest
  neighbour: every image pixel becomes a k x k block), an ``L x L`` block with ``L = S * k``.
- Images are laid out row-major in ``ncols`` columns; image ``i``'s top-left pixel in the PNG is at
  ``(y, x) = (pad + (i // ncols) * (cell_h + pad), pad + (i % ncols) * (cell_w + pad))``, where
  ``cell_w = max(L, widest text line)`` and ``cell_h = L + text block``. The returned
  :class:`PatchGrid` holds these origins, the PNG size and the boxes.
- A focus patch with top-left corner ``(r0, c0) = floor(action * (S - P))`` covers image pixels
  ``[r0, r0 + P) x [c0, c0 + P)``, i.e. PNG pixels ``[y + r0*k, y + (r0+P)*k) x [x + c0*k, x + (c0+P)*k)``.
  Its border is the outermost ``line_width`` pixels of that block, inside it, solid, in the step's
  colour; pixels just outside the block and inside the border keep the image's colour. The glance is a
  box around the whole image (step 1). Later steps are drawn over earlier ones.
- Each box carries its step number in a filled square of the step's colour (``tag`` pixels) in its
  top-left corner, inside the box; border pixels outside that corner square are pure border colour.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["STEP_COLORS", "IMAGENET_MEAN", "IMAGENET_STD", "patch_boxes", "exit_steps", "denormalize",
           "budget_thresholds", "read_thresholds", "load_images", "PatchGrid", "plot_patches",
           "BudgetSeries", "budget_series", "plot_budget_curve", "BenchRow", "read_bench_rows",
           "bench_speedups", "plot_bench", "render_report"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# matplotlib's tab10 as RGB bytes: step 1 (the glance) blue, then orange, green, red, purple, ...
STEP_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------- geometry
def patch_boxes(actions: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """The focus patches' pixel boxes from the policy's actions.

    Args:
        actions: Tensor[T-1, N, 2] (or [N, 2]) in [0, 1]; ``actions[..., 0]`` the row, ``[..., 1]`` the
            column, as :meth:`gfnet.GFNet.anytime_predict` returns them.
        image_size: S, the full image's side. patch_size: P.
    Returns:
        Tensor[T-1, N, 4] (or [N, 4]) int64 ``(row0, col0, row1, col1)``, end-exclusive: the patch covers
        rows ``row0 .. row1-1`` and columns ``col0 .. col1-1``. ``(row0, col0) = floor(action * (S - P))``
        computed in float32 like the model's crop (DESIGN.md, the focus step), so the box is exactly
        the crop the local encoder saw.
    """
    if actions.shape[-1] != 2:
        raise ValueError(f"actions must end in a (row, column) pair, got shape {tuple(actions.shape)}")
    if not 0 < patch_size <= image_size:
        raise ValueError(f"patch_size must be in 1..image_size ({image_size}), got {patch_size}")
    corner = torch.floor(actions.detach().float().cpu() * (image_size - patch_size)).long()
    corner = corner.clamp(0, image_size - patch_size)
    return torch.cat([corner, corner + patch_size], dim=-1)


def exit_steps(probs: torch.Tensor, thresholds: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """The 0-based step at which each image exits: the first ``t`` whose max probability >= threshold[t].

    Args:
        probs: Tensor[T, N, C] softmax outputs after each step. thresholds: T values (the reference
            stores -1e8 last, so every image exits at the last step at the latest).
    Returns:
        Tensor[N] int64 in 0..T-1 (T-1 when no threshold is reached: all steps ran).
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
    T = probs.shape[0]
    if thresholds.numel() != T:
        raise ValueError(f"need one threshold per step: {T} steps, got {thresholds.numel()} thresholds "
                         "(a dynamic_threshold table has one row per budget: pick a row)")
    confident = probs.detach().float().cpu().max(-1).values >= thresholds[:, None]
    confident[-1] = True
    return confident.int().argmax(0)


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Images for display: Tensor[N, 3, S, S] (float, normalised with mean/std; or uint8) ->
    np.uint8 array [N, S, S, 3]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, S, S], got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        out = x
    else:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        out = ((x.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------------------------- inputs
def budget_thresholds(meta: Mapping[str, Any], index: int) -> torch.Tensor:
    """Row ``index`` (0..38) of a checkpoint's ``dynamic_threshold`` table: Tensor[T].

    Row p is the reference's budget q = (p+1)/20 (exit proportions ~ q^k); row 19 (q = 1) lets equal
    shares exit at every step."""
    table = meta.get("dynamic_threshold")
    if table is None:
        raise ValueError("the checkpoint holds no dynamic_threshold table (it was never evaluated with "
                         "budgets): pass thresholds explicitly, e.g. --thresholds 0.9,0.8,-1e8")
    table = torch.as_tensor(table, dtype=torch.float32)
    if not -table.shape[0] <= index < table.shape[0]:
        raise ValueError(f"budget index {index} is outside the table's {table.shape[0]} rows")
    return table[index].clone()


def read_thresholds(spec: str, meta: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Thresholds from a command-line spec: a budget index into ``meta['dynamic_threshold']`` (``"19"``),
    comma-separated values (``"0.9,0.8,-1e8"``), or a file: ``.json`` (a list, or a dict with
    ``thresholds``), ``.pt``/``.pth`` (a tensor) or text (numbers separated by spaces/commas)."""
    spec = spec.strip()
    if re.fullmatch(r"-?\d+", spec) and not os.path.exists(spec):
        if meta is None:
            raise ValueError(f"--thresholds {spec} is a budget index, which needs a checkpoint")
        return budget_thresholds(meta, int(spec))
    if os.path.isfile(spec):
        ext = os.path.splitext(spec)[1].lower()
        if ext == ".json":
            with open(spec) as f:
                obj = json.load(f)
            if isinstance(obj, dict):
                if "thresholds" not in obj:
                    raise ValueError(f"{spec}: a JSON object needs a 'thresholds' list; keys: {list(obj)}")
                obj = obj["thresholds"]
            return torch.tensor(obj, dtype=torch.float32).flatten()
        if ext in (".pt", ".pth"):
            return torch.as_tensor(torch.load(spec, map_location="cpu", weights_only=True),
                                   dtype=torch.float32).flatten()
        with open(spec) as f:
            text = f.read()
        return torch.tensor([float(v) for v in re.split(r"[\s,]+", text.strip()) if v], dtype=torch.float32)
    try:
        return torch.tensor([float(v) for v in spec.split(",") if v.strip()], dtype=torch.float32)
    except ValueError:
        raise ValueError(f"--thresholds {spec!r} is neither a budget index, comma-separated numbers, "
                         "nor an existing file") from None


def _image_files(sources: Iterable[PathLike]) -> List[str]:
    files = []
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):  # recursive, so that an ImageNet-layout split (class folders) works too
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(src) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {src}")
            files.extend(found)
        elif os.path.isfile(src):
            files.append(src)
        else:
            raise FileNotFoundError(f"no image file or folder at {src}")
    return files


def load_images(sources: Union[PathLike, Sequence[PathLike]], image_size: int, crop_pct: float = 0.875,
                interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> Tuple[torch.Tensor, List[str]]:
    """Read image files (or every image under folders, recursively, sorted by path) as the validation
    transform does.

    The shorter side is resized to ``floor(image_size / crop_pct)``, the centre ``image_size`` square is
    cropped, and the result normalised with ``mean``/``std``.

    Returns:
        (Tensor[N, 3, S, S] float32 on the CPU, the list of N file paths).
    """
    from PIL import Image

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files = _image_files(sources)
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
               "lanczos": Image.LANCZOS}
    if interpolation not in filters:
        raise ValueError(f"interpolation must be one of {sorted(filters)}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    S = int(image_size)
    short = int(math.floor(S / crop_pct))
    out = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w <= h:
                size = (short, max(short, int(round(h * short / w))))
            else:
                size = (max(short, int(round(w * short / h))), short)
            im = im.resize(size, filters[interpolation])
            left, top = int(round((size[0] - S) / 2.0)), int(round((size[1] - S) / 2.0))
            arr = np.asarray(im.crop((left, top, left + S, top + S)), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    x = torch.stack(out).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s, files


# ----------------------------------------------------------------------------------------------- patches
@dataclass
class PatchGrid:
    """What :func:`plot_patches` drew, and where (see the module docstring for the geometry).

    path: the PNG written. size: its (width, height) in pixels. scale: k, PNG pixels per image pixel.
    line_width: box border width in PNG pixels. origins: per image, the (y, x) of its top-left pixel in
    the PNG. boxes: Tensor[T-1, N, 4] (row0, col0, row1, col1) in image pixels (:func:`patch_boxes`).
    probs: Tensor[T, N, C]. exit_step: Tensor[N] 0-based exit steps (None without thresholds).
    """

    path: str
    size: Tuple[int, int]
    scale: int
    line_width: int
    origins: List[Tuple[int, int]]
    boxes: torch.Tensor
    probs: torch.Tensor
    exit_step: Optional[torch.Tensor] = None


def _font(size: int):
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no matplotlib font or no FreeType: Pillow's own font still reads
        return ImageFont.load_default(size)


def _text_color_on(rgb: Tuple[int, int, int]) -> Tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _draw_box(panel: np.ndarray, box: Sequence[int], scale: int, width: int, color) -> None:
    """Solid border of ``width`` px on the outermost pixels of image box (r0, c0, r1, c1) scaled by k."""
    r0, c0, r1, c1 = (int(v) * scale for v in box)
    w = min(width, (r1 - r0) // 2, (c1 - c0) // 2)
    panel[r0:r0 + w, c0:c1] = color
    panel[r1 - w:r1, c0:c1] = color
    panel[r0:r1, c0:c0 + w] = color
    panel[r0:r1, c1 - w:c1] = color


def _class_name(idx: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= idx < len(class_names):
        return str(class_names[idx])
    return str(idx)


def plot_patches(net, images: torch.Tensor, out_path: PathLike,
                 thresholds: Optional[Union[torch.Tensor, Sequence[float]]] = None,
                 labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                 class_names: Optional[Sequence[str]] = None, ncols: int = 4, scale: Optional[int] = None,
                 line_width: Optional[int] = None, prediction=None, patch_size: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 colors: Sequence[Tuple[int, int, int]] = STEP_COLORS, batch_size: Optional[int] = 64,
                 titles: Optional[Sequence[str]] = None) -> PatchGrid:
    """Draw where a GFNet looks: the glance and each focus patch as numbered boxes on every image.

    Args:
        net: a :class:`gfnet.GFNet` (eval mode is set for the call and restored); it runs
            :meth:`~gfnet.GFNet.anytime_predict` on ``images`` (on the net's device) unless
            ``prediction`` is given, in which case ``net`` may be None (then pass ``patch_size``).
        images: Tensor[N, 3, S, S], float normalised with ``mean``/``std`` (or uint8 0..255).
        out_path: the PNG to write (folders are created).
        thresholds: T exit thresholds (e.g. a row of the checkpoint's ``dynamic_threshold``, see
            :func:`budget_thresholds`); the caption marks the step where each image exits
            (:func:`exit_steps`) and greys out the steps it would not run. None: no exit marked.
        labels: Tensor[N] true classes (captions add a tick or a cross per step). class_names: names
            of the classes for the captions (default: the class index).
        ncols: images per row. scale: k, PNG pixels per image pixel (default ``max(1, 256 // S)``).
        line_width: border width in PNG pixels (default ``max(3, min(k, 4))``).
        prediction: an :class:`gfnet.AnytimePrediction` to draw instead of running ``net``.
        colors: RGB per step, cycled (default matplotlib's tab10: step 1 blue, 2 orange, 3 green, ...).
        batch_size: chunk size for ``anytime_predict``. titles: per-image caption titles (default: the
            label, or the image's index).
    Returns:
        :class:`PatchGrid` with the path, PNG size, per-image origins and the boxes drawn.
    """
    from PIL import Image, ImageDraw

    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square [N, 3, S, S], got shape {tuple(images.shape)}")
    N, S = images.shape[0], images.shape[-1]
    if N == 0:
        raise ValueError("no images to draw")
    if prediction is None:
        if net is None:
            raise ValueError("pass a net to run, or a prediction to draw")
        was_training = net.training
        net.eval()
        try:
            device = next(net.parameters()).device
            prediction = net.anytime_predict(images.to(device), batch_size=batch_size)
        finally:
            net.train(was_training)
    if patch_size is None and net is None:
        raise ValueError("drawing a given prediction without a net needs patch_size")
    P = patch_size if patch_size is not None else net.patch_size
    probs = prediction.probs.detach().float().cpu()
    actions = prediction.actions.detach().float().cpu()
    T = probs.shape[0]
    if probs.shape[1] != N or actions.shape[:2] != (T - 1, N):
        raise ValueError(f"prediction shapes probs {tuple(probs.shape)} / actions {tuple(actions.shape)} "
                         f"do not fit {N} images and T={T} steps")
    boxes = patch_boxes(actions, S, P)
    exit_step = exit_steps(probs, thresholds) if thresholds is not None else None
    if labels is not None:
        labels = torch.as_tensor(labels).flatten().cpu()
        if labels.numel() != N:
            raise ValueError(f"{labels.numel()} labels for {N} images")
    k = int(scale) if scale is not None else max(1, 256 // S)
    if k < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    lw = int(line_width) if line_width is not None else max(3, min(k, 4))
    L = S * k
    pad = 10
    fs = max(11, min(16, L // 16))
    font = _font(fs)
    line_h = fs + 5
    tag = fs + 2

    conf, pred = probs.max(-1)
    captions = []  # per image: list of (text, swatch colour or None, text colour)
    for i in range(N):
        lines = []
        if titles is not None:
            title = str(titles[i])
        elif labels is not None:
            title = f"#{i}  label: {_class_name(int(labels[i]), class_names)}"
        else:
            title = f"#{i}"
        if exit_step is not None:
            title += f"  exit after step {int(exit_step[i]) + 1}/{T}"
        lines.append((title, None, (0, 0, 0)))
        for t in range(T):
            name = _class_name(int(pred[t, i]), class_names)
            text = f"{t + 1} {'glance' if t == 0 else 'focus'}: {name} ({float(conf[t, i]):.2f})"
            if labels is not None:
                text += "  \u2713" if int(pred[t, i]) == int(labels[i]) else "  \u2717"
            ran = exit_step is None or t <= int(exit_step[i])
            if exit_step is not None and t == int(exit_step[i]):
                text += "  \u2190 exit"
            lines.append((text, colors[t % len(colors)], (0, 0, 0) if ran else (150, 150, 150)))
        captions.append(lines)
    text_w = max(int(math.ceil(font.getlength(text))) + (tag + 4 if swatch else 0)
                 for lines in captions for text, swatch, _ in lines)
    cell_w = max(L, text_w)
    cell_h = L + 4 + line_h * (T + 1)
    ncols = max(1, min(int(ncols), N))
    nrows = (N + ncols - 1) // ncols
    width, height = pad + ncols * (cell_w + pad), pad + nrows * (cell_h + pad)

    pixels = denormalize(images, mean, std)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    origins = []
    for i in range(N):
        y, x = pad + (i // ncols) * (cell_h + pad), pad + (i % ncols) * (cell_w + pad)
        origins.append((y, x))
        panel = np.repeat(np.repeat(pixels[i], k, axis=0), k, axis=1)
        step_boxes = [(0, 0, S, S)] + [tuple(boxes[t, i].tolist()) for t in range(T - 1)]
        for t, box in enumerate(step_boxes):
            _draw_box(panel, box, k, lw, colors[t % len(colors)])
        canvas.paste(Image.fromarray(panel), (x, y))
        for t, box in enumerate(step_boxes):  # numbered tags in each box's top-left corner, inside it
            color = colors[t % len(colors)]
            ty, tx = y + box[0] * k, x + box[1] * k
            draw.rectangle([tx, ty, tx + tag - 1, ty + tag - 1], fill=color)
            draw.text((tx + tag / 2, ty + tag / 2), str(t + 1), fill=_text_color_on(color), font=font,
                      anchor="mm")
        ty = y + L + 4
        for text, swatch, text_color in captions[i]:
            tx = x
            if swatch is not None:
                draw.rectangle([tx, ty + 2, tx + tag - 1, ty + 1 + tag - 4], fill=swatch)
                tx += tag + 4
            draw.text((tx, ty), text, fill=text_color, font=font)
            ty += line_h
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return PatchGrid(out_path, (width, height), k, lw, origins, boxes, probs, exit_step)


# ----------------------------------------------------------------------------------------------- budget
@dataclass
class BudgetSeries:
    """One model's accuracy/cost numbers, Multiply-Adds as raw counts (not scaled).

    budget_macs/budget_acc: the budgeted batch classification curve (39 points in the reference);
    anytime_macs/anytime_acc: one point per step (cumulative cost of steps 1..t, top-1 after step t);
    baseline: (macs, acc) of the backbone alone, or None.
    """

    label: str
    budget_macs: List[float] = field(default_factory=list)
    budget_acc: List[float] = field(default_factory=list)
    anytime_macs: List[float] = field(default_factory=list)
    anytime_acc: List[float] = field(default_factory=list)
    baseline: Optional[Tuple[float, float]] = None


def _floats(v) -> List[float]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [float(x) for x in v.detach().cpu().flatten().tolist()]
    return [float(x) for x in np.asarray(v, dtype=np.float64).flatten().tolist()]


def _point(v) -> Optional[Tuple[float, float]]:
    """(macs, acc) from [macs, acc] or a dict with macs/flops and acc/top1."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        macs = next((v[key] for key in ("macs", "flops", "multiply_adds") if key in v), None)
        acc = next((v[key] for key in ("acc", "top1", "accuracy") if key in v), None)
        if macs is None or acc is None:
            raise ValueError(f"a baseline point needs macs (or flops) and acc (or top1); got keys {list(v)}")
        return float(macs), float(acc)
    vals = _floats(v)
    if len(vals) != 2:
        raise ValueError(f"a baseline point is (macs, acc), got {v!r}")
    return vals[0], vals[1]


_BUDGET_KEYS = ("budgeted_batch_classification", "budget_curve", "anytime_classification", "baseline",
                "backbone")


def _budget_pair(v) -> Tuple[List[float], List[float]]:
    if isinstance(v, Mapping):
        macs = next((v[key] for key in ("macs", "flops", "expected_flops") if key in v), None)
        acc = next((v[key] for key in ("acc", "top1", "accuracy") if key in v), None)
        return _floats(macs), _floats(acc)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping):
        return _budget_pair({key: [row[key] for row in v] for key in v[0]})
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _floats(v[0]), _floats(v[1])
    arr = torch.as_tensor(v)
    if arr.dim() == 2 and arr.shape[0] == 2:
        return _floats(arr[0]), _floats(arr[1])
    raise ValueError("a budget curve is [macs list, acc list] (the reference's budgeted_batch_classification),"
                     " a dict with macs/flops and acc/top1 lists, or a list of such rows")


def _read_source(source) -> Tuple[Mapping[str, Any], str]:
    if hasattr(source, "meta") and isinstance(getattr(source, "meta"), Mapping):
        return source.meta, ""
    if isinstance(source, Mapping):
        return source, ""
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint or results file at {path}")
    stem = os.path.basename(path)
    for ext in (".pth.tar", ".json", ".pth", ".pt", ".tar"):
        if stem.endswith(ext):
            stem = stem[:-len(ext)]
            break
    if path.lower().endswith(".json"):
        with open(path) as f:
            obj = json.load(f)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a results JSON nor a readable checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of results")
    return obj, stem


def budget_series(source, label: Optional[str] = None) -> BudgetSeries:
    """Read one source's accuracy/cost numbers.

    ``source``: a checkpoint path (reference format: ``budgeted_batch_classification`` = [macs list,
    acc list], ``anytime_classification`` = T accuracies, ``flops`` = T cumulative Multiply-Adds), a
    results ``.json`` path with the same fields, a loaded dict, or a net with ``.meta``. Results files
    may instead give ``budget_curve`` ([macs, acc], {"macs": [...], "acc": [...]} or rows of
    {"macs", "acc"}), and ``baseline`` (or ``backbone``) as [macs, acc] or {"macs", "acc"}. When the top
    level has none of these fields, the first dict-valued field that has them is read (for results
    files that nest them, e.g. under ``"eval"``).
    """
    d, stem = _read_source(source)
    if not any(key in d for key in _BUDGET_KEYS):
        nested = next((v for v in d.values() if isinstance(v, Mapping) and any(k in v for k in _BUDGET_KEYS)),
                      None)
        if nested is None:
            raise ValueError(f"{stem or 'source'}: no budget or anytime results in it (looked for "
                             f"{', '.join(_BUDGET_KEYS)}; keys: {list(d)[:12]})")
        d = {**{k: v for k, v in d.items() if not isinstance(v, Mapping)}, **nested}
    curve = d.get("budgeted_batch_classification", d.get("budget_curve"))
    budget_macs, budget_acc = _budget_pair(curve) if curve is not None else ([], [])
    anytime_acc = _floats(d.get("anytime_classification"))
    anytime_macs = _floats(d.get("flops"))[:len(anytime_acc)]
    if len(anytime_macs) != len(anytime_acc):
        anytime_acc = anytime_acc[:len(anytime_macs)]
    if len(budget_macs) != len(budget_acc):
        raise ValueError(f"{stem or 'source'}: the budget curve has {len(budget_macs)} costs but "
                         f"{len(budget_acc)} accuracies")
    baseline = _point(d.get("baseline", d.get("backbone")))
    if label is None:
        label = d.get("label")
    if label is None and d.get("model_name") is not None:
        label = f"GFNet {d['model_name']}"
        if d.get("patch_size") is not None:
            label += f" (P={d['patch_size']}, T={d.get('T', len(_floats(d.get('flops'))))})"
    series = BudgetSeries(str(label or stem or "GFNet"), budget_macs, budget_acc, anytime_macs, anytime_acc,
                          baseline)
    if not (series.budget_macs or series.anytime_macs or series.baseline):
        raise ValueError(f"{series.label}: its budget, anytime and baseline fields are all empty "
                         "(was the checkpoint ever evaluated?)")
    return series


def _mac_unit(values: Sequence[float], unit: Optional[str]) -> Tuple[float, str]:
    """(divisor, axis name) for raw Multiply-Adds counts; values below 100 are taken as GMACs already."""
    units = {"G": (1e9, "GMACs"), "M": (1e6, "MMACs"), "K": (1e3, "KMACs"), "1": (1.0, "MACs")}
    if unit is not None:
        if unit not in units:
            raise ValueError(f"unit must be one of {sorted(units)}, got {unit!r}")
        return units[unit]
    top = max(values) if values else 0.0
    if top < 100:  # no CNN costs under 100 Multiply-Adds: these are already GMACs (as in the paper's plots)
        return 1.0, "GMACs"
    return units["G"] if top >= 1e8 else units["M"] if top >= 1e5 else units["1"]


def _save_figure(fig, out_path: PathLike, dpi: int) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_path = os.fspath(out_path)
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in (".png", ".svg", ".pdf"):
        raise ValueError(f"write .png, .svg or .pdf, got {out_path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, dpi=dpi)
    return out_path


def plot_budget_curve(sources, out_path: PathLike, labels: Optional[Sequence[str]] = None,
                      baseline=None, title: Optional[str] = None, unit: Optional[str] = None,
                      dpi: int = 150, figsize: Tuple[float, float] = (6.4, 4.4)) -> List[BudgetSeries]:
    """Top-1 accuracy against Multiply-Adds, the GFNet paper's main figure, to PNG/SVG/PDF (by extension).

    For each source: the budgeted batch classification curve (a line), the anytime points (markers
    numbered by step, dashed) and, if the source has one, the backbone alone (a star).

    Args:
        sources: one source or a list; each a checkpoint path, results JSON path, loaded dict or net
            (see :func:`budget_series` for the fields read).
        out_path: ``.png``, ``.svg`` or ``.pdf``.
        labels: legend names, one per source (default: from the source).
        baseline: the backbone alone: ``(macs, acc)``, ``(macs, acc, label)`` or a list of those.
        unit: "G", "M", "K" or "1" for the x axis (default by magnitude: GMACs from 1e8 Multiply-Adds).
    Returns:
        the :class:`BudgetSeries` plotted (Multiply-Adds unscaled).
    """
    from matplotlib.figure import Figure

    if isinstance(sources, (str, os.PathLike, Mapping)) or hasattr(sources, "meta"):
        sources = [sources]
    sources = list(sources)
    if not sources and baseline is None:
        raise ValueError("nothing to plot: give at least one checkpoint or results file")
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} sources")
    series = [budget_series(s, None if labels is None else labels[i]) for i, s in enumerate(sources)]
    extra = []
    if baseline is not None:
        points = [baseline] if isinstance(baseline, tuple) or (
            isinstance(baseline, list) and baseline and not isinstance(baseline[0], (tuple, list))) \
            else list(baseline)
        for p in points:
            p = tuple(p)
            extra.append((float(p[0]), float(p[1]), str(p[2]) if len(p) > 2 else "backbone"))
    all_macs = [m for s in series for m in s.budget_macs + s.anytime_macs + ([s.baseline[0]] if s.baseline
                                                                            else [])] + [p[0] for p in extra]
    div, unit_name = _mac_unit(all_macs, unit)

    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    palette = ["#%02x%02x%02x" % c for c in STEP_COLORS]
    for i, s in enumerate(series):
        color = palette[i % len(palette)]
        if s.budget_macs:
            order = np.argsort(s.budget_macs)
            ax.plot(np.asarray(s.budget_macs)[order] / div, np.asarray(s.budget_acc)[order], "-", color=color,
                    lw=2, label=f"{s.label}: budgeted")
        if s.anytime_macs:
            xs = np.asarray(s.anytime_macs) / div
            ax.plot(xs, s.anytime_acc, "o--", color=color, lw=1, ms=6, mfc="white", mew=1.5,
                    label=f"{s.label}: anytime (steps 1..{len(xs)})")
            for t, (x, y) in enumerate(zip(xs, s.anytime_acc)):
                ax.annotate(str(t + 1), (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8,
                            color=color)
        if s.baseline is not None:
            ax.plot([s.baseline[0] / div], [s.baseline[1]], "*", color=color, ms=13, mec="black", mew=0.6,
                    label=f"{s.label}: backbone alone")
    for j, (macs, acc, name) in enumerate(extra):
        ax.plot([macs / div], [acc], "*", color=palette[(len(series) + j) % len(palette)], ms=13, mec="black",
                mew=0.6, label=name)
    ax.set_xlabel(f"Multiply-Adds per image ({unit_name})")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs. Multiply-Adds (budgeted batch classification)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, out_path, dpi)
    return series


# ----------------------------------------------------------------------------------------------- bench
@dataclass
class BenchRow:
    """One normalised ``gfnet-bench`` row: ``time_s`` the median seconds per call (None if the row has
    no time), ``throughput`` items/s, ``speedup`` over the case's baseline row (filled by
    :func:`bench_speedups`), ``raw`` the original row."""

    suite: str
    provider: str
    case: str
    time_s: Optional[float]
    spread_s: Optional[float]
    throughput: Optional[float]
    is_baseline: bool
    speedup: Optional[float]
    device: str
    raw: Mapping[str, Any]


# (key, seconds per unit) in order of preference
_TIME_KEYS = (("median_s", 1.0), ("median_ms", 1e-3), ("median_us", 1e-6), ("median", 1.0),
              ("median_time_s", 1.0), ("median_time", 1.0), ("time_median", 1.0), ("time_s", 1.0),
              ("time_ms", 1e-3), ("mean_s", 1.0), ("mean_ms", 1e-3), ("mean", 1.0))
_SPREAD_KEYS = (("iqr_s", 1.0), ("iqr_ms", 1e-3), ("iqr_us", 1e-6), ("iqr", 1.0), ("std_s", 1.0),
                ("std_ms", 1e-3), ("stddev", 1.0), ("std", 1.0))
_THROUGHPUT_KEYS = ("throughput", "images_per_s", "imgs_per_s", "items_per_s", "samples_per_s", "img_s")
_PROVIDER_KEYS = ("provider", "name", "impl", "method")
_BASELINE_NAMES = ("baseline", "reference", "ref", "eager", "pytorch", "torch", "torchvision", "pil")
# fields that never describe a case: identity, environment and measurements
_NOT_CASE = re.compile(r"^(suite|provider|name|impl|method|baseline|case|device|gpu|cpu|host|hostname|git.*|rev"
                       r"|revision|commit|version.*|.*_version|torch|triton|cuda|dali|python|timestamp|date|time"
                       r"|unit|units|speedup|rounds|repeats|runs|iterations|warmup|n_runs)$"
                       r"|median|mean|min|max|std|iqr|p\d\d|throughput|per_s|speedup|_s$|_ms$|_us$|_ns$|bandwidth|gb_s"
                       r"|gbps|ratio|percent|accuracy|top1")


def _rows_of(obj, default_suite: str) -> List[dict]:
    meta = {}
    if isinstance(obj, Mapping):
        meta = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
        rows = obj.get("rows", obj.get("results", obj.get("benchmarks")))
        if rows is None:
            raise ValueError(f"a bench results object needs a 'rows' list; keys: {list(obj)[:10]}")
    else:
        rows = obj
    out = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"bench rows must be objects, got {type(row).__name__}")
        merged = {**meta, **row}
        merged.setdefault("suite", default_suite)
        out.append(merged)
    return out


def read_bench_rows(sources) -> List[dict]:
    """Rows from ``gfnet-bench`` result files (a JSON list of rows, or an object with ``rows`` whose
    other scalar fields, e.g. device or git revision, apply to every row), or from rows given directly.
    A row without ``suite`` takes the file's name."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(sources, Mapping):
        return _rows_of(sources, "bench")
    rows = []
    for src in sources:
        if isinstance(src, Mapping) and any(k in src for k in ("rows", "results", "benchmarks")):
            rows.extend(_rows_of(src, "bench"))
        elif isinstance(src, Mapping):
            rows.append({"suite": "bench", **src})
        else:
            path = os.fspath(src)
            with open(path) as f:
                obj = json.load(f)
            rows.extend(_rows_of(obj, os.path.splitext(os.path.basename(path))[0]))
    return rows


def _first(row: Mapping[str, Any], keys) -> Optional[float]:
    for key, factor in keys:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v) * factor
    return None


def _case_keys(rows: Sequence[Mapping[str, Any]], providers: Sequence[str]) -> List[str]:
    """The fewest descriptive fields that tell one provider's rows apart (batch, backbone, budget...).

    Candidates are scalar fields that are neither measurements nor the environment; the one with most
    distinct values goes first and a field is kept only if it splits some provider's rows further, so
    that fields decided by another (T and image size by the backbone) stay out of the case's name."""
    candidates = {k for r in rows for k, v in r.items()
                  if isinstance(v, (str, int, float, bool)) and not _NOT_CASE.search(k)}
    distinct = {k: len({json.dumps(r.get(k)) for r in rows}) for k in candidates}
    chosen: List[str] = []

    def groups(keys):
        return len({(p, tuple(json.dumps(r.get(k)) for k in keys)) for r, p in zip(rows, providers)})

    for key in sorted(candidates, key=lambda k: (-distinct[k], k)):
        if groups(chosen + [key]) > groups(chosen):
            chosen.append(key)
    return chosen


def bench_speedups(rows: Sequence[Mapping[str, Any]]) -> List[BenchRow]:
    """Normalise bench rows and compute each one's speedup over the baseline row of its case.

    Reads per row: ``suite``; the provider (``provider``, ``name``, ``impl`` or ``method``); the median
    time (``median_s``, ``median_ms``, ``median_us``, ``median`` in seconds, ...); the spread (``iqr_*``
    or ``std*``); the throughput (``throughput``, ``images_per_s``, ...). A case is the set of rows of a
    suite that share ``case`` if rows have one, else the values of the descriptive fields (not a
    measurement, not the environment) that tell one provider's rows apart (backbone, batch size,
    budget, ...). The baseline of a case is the row with ``baseline: true``, else the first row whose
    provider's name holds, in this order of preference, the word baseline, reference, ref, eager,
    pytorch, torch, torchvision or pil, else the case's first row. Speedup = the row's own ``speedup``
    or ``speedup_*`` field when it has one (the suite knows best how it measured it), else baseline
    time / time, else throughput / baseline throughput.
    """
    by_suite: dict = {}
    for row in rows:
        by_suite.setdefault(str(row.get("suite", "bench")), []).append(row)
    out: List[BenchRow] = []
    for suite, suite_rows in by_suite.items():
        provider_of = [str(next((r[k] for k in _PROVIDER_KEYS if k in r), f"row {i}"))
                       for i, r in enumerate(suite_rows)]
        if any("case" in r for r in suite_rows):
            case_keys = ["case"]
        else:
            case_keys = _case_keys(suite_rows, provider_of)
        cases: dict = {}
        for r, p in zip(suite_rows, provider_of):
            case = " ".join(f"{k}={r[k]}" if k != "case" else str(r[k]) for k in case_keys if k in r) or "-"
            cases.setdefault(case, []).append((r, p))
        for case, members in cases.items():
            flagged = [j for j, (r, _) in enumerate(members) if r.get("baseline") is True]
            named = [j for name in _BASELINE_NAMES for j, (_, p) in enumerate(members)
                     if re.search(rf"\b{name}\b", p.lower())]
            base = flagged[0] if flagged else named[0] if named else 0
            base_row = members[base][0]
            base_t, base_thr = _first(base_row, _TIME_KEYS), _first(base_row, [(k, 1.0) for k in _THROUGHPUT_KEYS])
            for j, (r, p) in enumerate(members):
                t = _first(r, _TIME_KEYS)
                thr = _first(r, [(k, 1.0) for k in _THROUGHPUT_KEYS])
                own = _first(r, [(key, 1.0) for key in sorted(r) if key == "speedup" or key.startswith("speedup_")])
                if own is not None:  # the suite's own figure (e.g. a median of per-epoch ratios) wins
                    speedup = own
                elif t and base_t:
                    speedup = base_t / t
                elif thr and base_thr:
                    speedup = thr / base_thr
                else:
                    speedup = None
                out.append(BenchRow(suite, p, case, t, _first(r, _SPREAD_KEYS), thr, j == base, speedup,
                                    str(r.get("device", "")), r))
    return out


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    for div, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if t >= div:
            return f"{t / div:.3g} {name}"
    return f"{t / 1e-9:.3g} ns"


def plot_bench(json_path_or_rows, out_path: PathLike, dpi: int = 120) -> List[str]:
    """``gfnet-bench`` results as a table and a bar chart of speedups, one PNG per suite.

    Args:
        json_path_or_rows: a results JSON path (or a list of paths), or rows (see :func:`read_bench_rows`
            and :func:`bench_speedups` for the fields read).
        out_path: a folder (then ``<folder>/<suite>.png`` per suite), or a file name ``NAME.png``: one
            suite writes it as is, several write ``NAME_<suite>.png`` each.
    Returns:
        the paths written, in suite order.
    """
    from matplotlib.figure import Figure

    if isinstance(json_path_or_rows, (str, os.PathLike)) or (
            isinstance(json_path_or_rows, (list, tuple)) and json_path_or_rows
            and all(isinstance(x, (str, os.PathLike)) for x in json_path_or_rows)):
        rows = read_bench_rows(json_path_or_rows)
    else:
        rows = read_bench_rows(list(json_path_or_rows) if not isinstance(json_path_or_rows, Mapping)
                               else json_path_or_rows)
    table = bench_speedups(rows)
    if not table:
        raise ValueError("no bench rows to plot")
    suites = list(dict.fromkeys(r.suite for r in table))
    out_path = os.fspath(out_path)
    is_dir = os.path.isdir(out_path) or out_path.endswith(os.sep) or not os.path.splitext(out_path)[1]
    written = []
    for suite in suites:
        srows = [r for r in table if r.suite == suite]
        if is_dir:
            path = os.path.join(out_path, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', suite)}.png")
        elif len(suites) == 1:
            path = out_path
        else:
            root, ext = os.path.splitext(out_path)
            path = f"{root}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', suite)}{ext}"
        cells = [[r.case, r.provider + (" (baseline)" if r.is_baseline else ""), _fmt_time(r.time_s),
                  _fmt_time(r.spread_s) if r.spread_s is not None else "-",
                  f"{r.throughput:,.1f}" if r.throughput is not None else "-",
                  f"{r.speedup:.2f}x" if r.speedup is not None else "-"] for r in srows]
        devices = sorted({r.device for r in srows if r.device})
        n = len(srows)
        fig = Figure(figsize=(9.0, 1.2 + 0.28 * n + 0.9 + 0.32 * n))
        gs = fig.add_gridspec(2, 1, height_ratios=[0.5 + 0.28 * n, 0.6 + 0.32 * n])
        ax_t = fig.add_subplot(gs[0])
        ax_t.axis("off")
        header = ["case", "provider", "median", "spread", "items/s", "speedup"]
        chars = [max(len(str(row[j])) for row in cells + [header]) + 2 for j in range(len(header))]
        tbl = ax_t.table(cellText=cells, colLabels=header, cellLoc="left", colLoc="left",
                         colWidths=[c / sum(chars) for c in chars], bbox=[0, 0, 1, 1])
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(8)
        ax_t.set_title(f"gfnet-bench: {suite}" + (f"  ({', '.join(devices)})" if devices else ""), fontsize=10)
        ax_b = fig.add_subplot(gs[1])
        names = [f"{r.provider} | {r.case}" if r.case != "-" else r.provider for r in srows]
        vals = [r.speedup if r.speedup is not None else 0.0 for r in srows]
        providers = list(dict.fromkeys(r.provider for r in srows if not r.is_baseline))
        palette = ["#%02x%02x%02x" % c for c in STEP_COLORS if c != (127, 127, 127)]
        colors = ["#7f7f7f" if r.is_baseline else palette[providers.index(r.provider) % len(palette)]
                  for r in srows]
        ypos = np.arange(n)[::-1]
        ax_b.barh(ypos, vals, color=colors)
        ax_b.set_yticks(ypos, names, fontsize=7)
        ax_b.axvline(1.0, color="black", lw=0.8, ls="--")
        for y, v in zip(ypos, vals):
            ax_b.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        ax_b.set_xlabel("speedup over the case's baseline (x)")
        ax_b.set_xlim(0, max(vals + [1.0]) * 1.18)
        fig.tight_layout()
        box = ax_t.get_position()  # the table spans the figure's width, not just the bar chart's axes
        ax_t.set_position([0.02, box.y0, 0.96, box.height])
        written.append(_save_figure(fig, path, dpi))
    return written


# ----------------------------------------------------------------------------------------------- report
def render_report(demo_dir: PathLike, threshold_index: int = 19, max_images: int = 8, ncols: int = 4,
                  bench=None) -> dict:
    """The README's pictures from a ``gfnet-demo`` output folder.

    Expected layout of ``demo_dir``:

    - ``checkpoint.pth.tar``: the trained GFNet in the reference format (:func:`gfnet.save_checkpoint`),
      with ``anytime_classification``, ``flops``, ``budgeted_batch_classification`` and
      ``dynamic_threshold`` filled in.
    - ``results.json`` (optional): extra numbers for the budget curve; read by :func:`budget_series`:
      ``baseline`` (or ``backbone``) ``[macs, acc]`` of the backbone alone, and any of the fields above
      (they override the checkpoint's). Optional ``image_size``/``class_names`` are not needed here.
    - ``samples.pt``: a dict saved with torch.save: ``images`` Tensor[N, 3, S, S] float normalised with
      ImageNet's mean/std (or uint8), ``labels`` Tensor[N] int64 (optional), ``class_names`` list of str
      (optional). The first ``max_images`` are drawn.

    Writes ``patches.png`` (thresholds: row ``threshold_index`` of ``dynamic_threshold``, 19 = equal
    exit shares, the middle row if the table is shorter; no exit is marked when there is no table),
    ``budget_curve.png``, and, when ``bench`` names result JSON files, ``bench.png`` (one suite) or
    ``bench_<suite>.png`` per suite. Returns {"patches": path, "budget_curve": path, "bench": [paths]}.
    """
    from gfnet.checkpoint import load_checkpoint

    demo_dir = os.fspath(demo_dir)
    ckpt = os.path.join(demo_dir, "checkpoint.pth.tar")
    net = load_checkpoint(ckpt)
    meta = dict(net.meta)
    results_path = os.path.join(demo_dir, "results.json")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if isinstance(results, Mapping):
            meta.update({k: v for k, v in results.items() if k in _BUDGET_KEYS + ("flops", "label")})
    out = {"bench": []}
    samples_path = os.path.join(demo_dir, "samples.pt")
    if not os.path.isfile(samples_path):
        raise FileNotFoundError(f"{samples_path} is missing: save a dict with 'images' (Tensor[N, 3, S, S]) "
                                "and 'labels' there to draw the patches")
    samples = torch.load(samples_path, map_location="cpu", weights_only=True)
    if not isinstance(samples, Mapping) or "images" not in samples:
        raise ValueError(f"{samples_path} must hold a dict with 'images' (and optionally 'labels', "
                         "'class_names')")
    images = samples["images"][:max_images]
    labels = samples.get("labels")
    thresholds = None
    if meta.get("dynamic_threshold") is not None:
        rows = len(meta["dynamic_threshold"])
        thresholds = budget_thresholds(meta, threshold_index if 0 <= threshold_index < rows else rows // 2)
    out["patches"] = plot_patches(net, images, os.path.join(demo_dir, "patches.png"), thresholds=thresholds,
                                  labels=None if labels is None else labels[:max_images],
                                  class_names=samples.get("class_names"), ncols=ncols).path
    curve = os.path.join(demo_dir, "budget_curve.png")
    plot_budget_curve([meta], curve)
    out["budget_curve"] = curve
    if bench:
        out["bench"] = plot_bench(bench, os.path.join(demo_dir, "bench.png"))
    return out
