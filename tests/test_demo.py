"""The demo's task and its --quick run end to end."""
import json
import os

import pytest
import torch

from gfnet.demo import QUICK, digit_patch_actions, make_cluttered_digits


@pytest.fixture(autouse=True)
def one_thread():
    # These tiny models are dominated by per-op overhead: one thread is as fast on an idle machine and
    # avoids OpenMP's spinning barriers, which make two threads crawl on a shared, loaded one.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_cluttered_digits_place_the_digit_at_its_box():
    images, labels, boxes = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=0, seed=3)
    assert images.shape == (16, 3, 48, 48) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9
    for i in range(16):
        r, c = boxes[i].tolist()
        inside = images[i, 0, r:r + 12, c:c + 12].sum()
        assert inside == images[i, 0].sum() > 0  # without fragments, all ink is in the digit's box
    # same arguments, same images; train and test draw from disjoint digits
    again, _, _ = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=0, seed=3)
    assert torch.equal(images, again)
    cluttered, _, _ = make_cluttered_digits(16, "train", canvas=48, digit_size=12, fragments=3, seed=3)
    assert cluttered.sum() > images.sum()


def test_digit_patch_actions_cover_the_digit():
    boxes = torch.tensor([[0, 0], [36, 36], [10, 20]])
    a = digit_patch_actions(boxes, canvas=48, digit_size=12, patch_size=24)
    corner = torch.floor(a * (48 - 24)).long()
    assert ((corner <= boxes) & (corner + 24 >= boxes + 12)).all()


def test_demo_quick_end_to_end(tmp_path):
    from gfnet.cli.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--quick", "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1  # the demo restores the caller's thread count
    results = json.loads((out / "results.json").read_text())
    T = QUICK.T
    assert len(results["anytime_accuracy_learned_policy"]) == T
    assert len(results["anytime_accuracy_random_patches"]) == T
    assert set(results["claims"]) >= {"T_steps_beat_glance", "learned_policy_beats_random"}
    import gfnet

    net = gfnet.load_checkpoint(str(out / "gfnet_demo.pth.tar"))
    assert net.T == T and net.meta["anytime_classification"] == results["anytime_accuracy_learned_policy"]
    assert len(net.meta["budgeted_batch_classification"][1]) == 39
    assert tuple(net.meta["dynamic_threshold"].shape) == (39, T)
    for fig in results["figures"]:
        assert os.path.getsize(fig) > 0
    assert (out / "patches.png").exists() and (out / "budget_curve.png").exists()
