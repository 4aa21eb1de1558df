"""Checks of the training data against the run: the loader yields batches, its classes are the net's."""
from __future__ import annotations

from typing import Iterable

__all__ = ["check_data_classes", "check_loader"]


def check_loader(loader: Iterable, world_size: int = 1) -> None:
    """ValueError when the training ``loader`` yields no batch (its images make no full batch per process)."""
    try:
        batches = len(loader)
    except TypeError:  # no len(): train_epoch reports an empty epoch instead
        return
    if batches == 0:
        stats = getattr(loader, "stats", None)
        size = getattr(loader, "batch_size", None)
        have = f"{stats.valid} valid training images" if stats is not None else "the training images"
        raise ValueError(f"the training loader yields no batch: {have} make no full batch of {size} per "
                         f"process ({world_size} process(es)); lower the batch size or add images")


def check_data_classes(net, *loaders) -> None:
    """The loaders' class names (gfnet.data loaders have ``classes``) must be the ones the net classifies:
    labels are positions in that list. A net that names none takes the training loader's."""
    from gfnet.data.index import class_list_difference

    for loader in loaders:
        names = getattr(loader, "classes", None)
        if names is None:
            continue
        known = net.meta.classes
        if known is None:
            if len(names) != net.num_classes:
                raise ValueError(f"the data has {len(names)} classes, the net classifies {net.num_classes}")
            net.meta.classes = list(names)
        elif list(names) != list(known):
            raise ValueError(f"the data's classes are not the {len(known)} that the net classifies: "
                             f"{class_list_difference(known, names)}; build every loader with "
                             "make_loader(..., classes=<the training split's>)")
