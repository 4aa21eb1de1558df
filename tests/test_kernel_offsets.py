"""The Triton kernels' address arithmetic past 2^31 elements, under the interpreter (numpy's int32 wraps as the
GPU's does).

A planar batch (one [3, N, H, W] buffer seen as NCHW, as some decoders hand it) has a channel stride of
N * H * W elements; past 2^30 of them, channel 2's offset ``c * stride`` no longer fits in int32. The buffer
here is a 2 GiB+ allocation of which only the pixels read are ever touched (the pages of the rest are never
mapped), and the kernels run in a subprocess: before the fix the wrapped offset reads far outside the buffer,
which crashes the interpreter or returns garbage.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
import torch
from gfnet import ops

H = W = 24
STRIDE = 2 ** 30 + 64  # channel stride in elements: 2 * STRIDE > 2^31
storage = torch.empty(2 * STRIDE + H * W, dtype=torch.uint8)  # virtual: untouched pages stay unmapped
planar = storage.as_strided((1, 3, H, W), (H * W, STRIDE, W, 1))
planar.copy_(torch.randint(0, 256, (1, 3, H, W), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
dense = planar.contiguous()
actions = torch.tensor([[0.3, 0.7]])
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
report = {}
calls = {
    "focus_crop": lambda x, b: ops.focus_crop(x, actions, 8, mean=mean, std=std, backend=b),
    "glance_resize": lambda x, b: ops.glance_resize(x, 9, mode="bilinear", mean=mean, std=std, backend=b),
    "glance_resize_bicubic": lambda x, b: ops.glance_resize(x, 9, mean=mean, std=std, backend=b),
    "focus_crop_bilinear": lambda x, b: ops.focus_crop_bilinear(x, actions, 8, scale=0.9, mean=mean, std=std,
                                                                backend=b),
}
for name, call in calls.items():
    got, want = call(planar, "triton"), call(dense, "torch")
    report[name] = float((got - want).abs().max())
print(json.dumps(report))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux's lazy mapping of a 2 GiB allocation")
def test_channel_offsets_past_2_pow_31_elements():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"the kernels crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    # the same pixels through the reference on a dense copy: float32 rounding of the interpolations only
    assert all(diff < 1e-4 for diff in worst.values()), worst
