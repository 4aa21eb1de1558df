"""What gfnet-viz reads besides checkpoints: image files (through the data loaders' validation transform)
and exit thresholds (a budget row of a checkpoint, numbers, or a file)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from gfnet.budget import check_threshold_table, check_thresholds
from gfnet.data.index import IMAGE_EXTENSIONS
from gfnet.viz.style import PathLike

__all__ = ["budget_thresholds", "read_thresholds", "image_files", "load_images"]


def budget_thresholds(meta: Mapping[str, Any], index: int) -> torch.Tensor:
    """Row ``index`` (0..38) of a checkpoint's ``dynamic_threshold`` table: Tensor[T].

    Row p is the reference's budget q = (p+1)/20 (exit proportions ~ q^k); row 19 (q = 1) lets equal
    shares exit at every step."""
    table = meta.get("dynamic_threshold")
    if table is None:
        raise ValueError("the checkpoint holds no dynamic_threshold table (it was never evaluated with "
                         "budgets): pass thresholds explicitly, e.g. --thresholds 0.9,0.8,-1e8")
    table = check_threshold_table(table, what="the checkpoint's dynamic_threshold").float()
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
    what = f"--thresholds {spec}"
    if os.path.isfile(spec):
        ext = os.path.splitext(spec)[1].lower()
        if ext == ".json":
            with open(spec) as f:
                obj = json.load(f)
            if isinstance(obj, dict):
                if "thresholds" not in obj:
                    raise ValueError(f"{spec}: a JSON object needs a 'thresholds' list; keys: {list(obj)}")
                obj = obj["thresholds"]
            return check_thresholds(obj, what=what).float()
        if ext in (".pt", ".pth"):
            return check_thresholds(torch.load(spec, map_location="cpu", weights_only=True), what=what).float()
        with open(spec) as f:
            text = f.read()
        values = [v for v in re.split(r"[\s,]+", text.strip()) if v]
    else:
        values = [v for v in spec.split(",") if v.strip()]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--thresholds {spec!r} is neither a budget index, comma-separated numbers, "
                         "nor an existing file of numbers") from None
    return check_thresholds(torch.tensor(numbers, dtype=torch.float32), what=what)


def image_files(sources: Iterable[PathLike]) -> List[str]:
    """Image paths from files and folders (folders searched recursively, so that an ImageNet-layout split
    with class folders works too; sorted by path; hidden files skipped). The extensions are the data
    index's (:data:`gfnet.data.index.IMAGE_EXTENSIONS`)."""
    files = []
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(src) for f in names
                           if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {src}")
            files.extend(found)
        elif os.path.isfile(src):
            files.append(src)
        else:
            raise FileNotFoundError(f"no image file or folder at {src}")
    return files


def load_images(sources: Union[PathLike, Sequence[PathLike]], image_size: int, crop_pct: float = 0.875,
                interpolation: str = "bilinear") -> Tuple[torch.Tensor, List[str]]:
    """Read image files (or every image under folders) exactly as the evaluation loader does.

    The transform is the data loaders' own validation transform
    (:func:`gfnet.data.torchvision_backend.build_transform`: torchvision ``Resize(int(S / crop_pct))``,
    ``CenterCrop(S)``, ``ToTensor``, ``Normalize`` with the ImageNet mean/std), so a picture shows the
    pixels the network is evaluated on.

    Args:
        sources: a file or folder, or a list of them. image_size: S. crop_pct: in (0, 1].
        interpolation: "bilinear", "bicubic", "nearest" or "lanczos".
    Returns:
        (Tensor[N, 3, S, S] float32 normalised, on the CPU; the list of N file paths).
    """
    from PIL import Image

    from gfnet.data.loader import INTERPOLATIONS, TransformSpec
    from gfnet.data.torchvision_backend import build_transform

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    files = image_files(sources)
    S = int(image_size)
    transform = build_transform(TransformSpec(train=False, image_size=S, resize_size=int(S / crop_pct),
                                              interpolation=interpolation, output="float"))
    out = []
    for path in files:
        with Image.open(path) as im:
            out.append(transform(im.convert("RGB")))
    return torch.stack(out), files
