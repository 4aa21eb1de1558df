"""Where a GFNet looks: the glance and each focus patch drawn on the full image as numbered boxes.

:func:`plot_patches`: for every image, the glance and each focus patch as numbered boxes, the prediction
and confidence after each step, and the step at which the image would exit under given thresholds (GFNet,
Section 3 and Figure 1; the reference's README promised this and never shipped it). A grid of images in
one PNG, drawn with Pillow.

Geometry (so that a test, or a person, can find any pixel):

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

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gfnet.budget import check_thresholds, exit_steps
from gfnet.data import IMAGENET_MEAN, IMAGENET_STD
from gfnet.viz.style import STEP_COLORS, PathLike

__all__ = ["patch_boxes", "exit_steps", "denormalize", "PatchGrid", "plot_patches"]


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
    if thresholds is not None:  # before the net runs
        thresholds = check_thresholds(thresholds, net.T if net is not None else None, "thresholds")
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
