"""Input pipelines for ImageNet-layout folders: DALI (GPU or CPU) and a torchvision fallback.

- :func:`make_loader`: batches ``(images, labels)`` of one split, sharded, with the reference's
  transforms; broken files reported and skipped (:mod:`gfnet.data.loader`).
- :func:`index_split`: the validated, cached file list of a split (:mod:`gfnet.data.index`);
  :func:`list_classes`: a split's class folders.
- :func:`make_sample_tree`: a small sample tree of real JPEGs, no download (:mod:`gfnet.data.sample`).
"""
from gfnet.data.index import IMAGE_EXTENSIONS, SplitIndex, class_list_difference, index_split, list_classes
from gfnet.data.loader import IMAGENET_MEAN, IMAGENET_STD, ImageLoader, LoaderStats, default_num_threads, make_loader
from gfnet.data.sample import SampleTree, make_sample_tree

__all__ = ["make_loader", "ImageLoader", "LoaderStats", "default_num_threads", "index_split", "SplitIndex",
           "list_classes", "class_list_difference",
           "IMAGE_EXTENSIONS", "make_sample_tree", "SampleTree", "IMAGENET_MEAN", "IMAGENET_STD"]
