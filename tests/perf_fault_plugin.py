"""A pytest plugin for tests/test_bench.py: breaks gfnet.ops.focus_crop (one patch pixel off), so that the
performance suite's output check can be seen to fail."""
import gfnet.ops

_crop = gfnet.ops.focus_crop


def _off_by_one(*args, **kwargs):
    out = _crop(*args, **kwargs)
    out[0, 0, 0, 0] += 1.0
    return out


gfnet.ops.focus_crop = _off_by_one
