"""gfnet-eval modes 0, 1 and 2 end to end on a tiny sample tree and a tiny timm checkpoint."""

import pytest
import torch

import gfnet
from gfnet import budget
from gfnet.cli.eval import main
from gfnet.data import make_loader, make_sample_tree
from gfnet.evaluation import evaluate_checkpoint

T = 3


pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tree = root / "tree"
    make_sample_tree(tree, num_classes=4, train_per_class=4, val_per_class=2, photo_size=(64, 48))
    torch.manual_seed(0)
    # a cascade classifier on a 10-layer ResNet: the cheapest timm backbone that runs the whole path
    net = gfnet.build_model("resnet10t", patch_size=32, T=T, num_classes=4, classifier="cascade").eval()
    with torch.no_grad():  # sharper outputs than at initialisation: thresholds split the images
        for k in range(2, T + 1):
            getattr(net.fc, f"fc_{k}").weight.mul_(30.0)
        net.model_prime.head.weight.mul_(30.0)
    checkpoint = root / "tiny.pth.tar"
    gfnet.save_checkpoint(net, str(checkpoint))
    return str(tree), str(checkpoint), net


COMMON = ["--backend", "torchvision", "--num-threads", "0", "--batch-size", "4"]


def test_mode0_prints_stored_fields_without_building_a_model(setup, tmp_path, capsys, monkeypatch):
    _, checkpoint, net = setup
    stored = tmp_path / "stored.pth.tar"
    curve = [[1.0 + p for p in range(39)], [50.0 + p / 2 for p in range(39)]]
    gfnet.save_checkpoint(net, str(stored), anytime_classification=[10.0, 20.0, 30.0],
                          budgeted_batch_classification=curve)

    def no_model(*args, **kwargs):
        raise AssertionError("eval mode 0 must not build the model")

    monkeypatch.setattr("gfnet.checkpoint.load_checkpoint", no_model)
    assert main(["--checkpoint", str(stored), "--eval-mode", "0"]) == 0
    out = capsys.readouterr().out
    for key in ("model_arch: resnet10t", "patch_size: 32", "flops:", "model_flops:", "policy_flops:",
                "fc_flops:", "anytime_classification: [10.0000, 20.0000, 30.0000]", "budgeted_batch_classification:"):
        assert key in out, key
    flops = torch.load(str(stored), weights_only=True)["flops"]
    assert f"flops: [{', '.join(str(f) for f in flops)}]" in out


def test_mode2_then_mode1_end_to_end(setup, capsys):
    tree, checkpoint, net = setup
    before = open(checkpoint, "rb").read()
    # mode 1 needs stored thresholds: this checkpoint has none yet
    assert main(["--checkpoint", checkpoint, "--eval-mode", "1", "--data", tree] + COMMON) == 2  # bad input
    assert "dynamic_threshold" in capsys.readouterr().err

    assert main(["--checkpoint", checkpoint, "--eval-mode", "2", "--data", tree, "--write",
                 "--train-subset", "12"] + COMMON) == 0
    printed = capsys.readouterr().out
    assert "fitting thresholds on 12 training images" in printed
    assert "anytime_classification" in printed and "budgeted batch classification" in printed
    assert open(checkpoint, "rb").read() != before
    stored = torch.load(checkpoint, weights_only=True)
    thresholds = stored["dynamic_threshold"]
    assert thresholds.shape == (39, T) and (thresholds[:, -1] == budget.LAST_STEP_THRESHOLD).all()
    costs, accuracies = stored["budgeted_batch_classification"]
    assert len(costs) == len(accuracies) == 39

    # the stored numbers are what the post-hoc procedure gives on the same images
    loaded = gfnet.load_checkpoint(checkpoint)
    loader_args = dict(batch_size=4, image_size=loaded.config.image_size, crop_pct=loaded.config.crop_pct,
                       interpolation=loaded.config.dataset_interpolation, backend="torchvision", num_threads=0)
    images, labels = map(torch.cat, zip(*make_loader(tree, train=False, **loader_args)))
    probs = loaded.anytime_predict(images).probs
    anytime = [float((probs[k].argmax(1) == labels).double().mean() * 100) for k in range(T)]
    assert stored["anytime_classification"] == pytest.approx(anytime)
    for p in (1, 20, 39):
        accuracy, cost = budget.evaluate(probs, labels, stored["flops"], thresholds[p - 1])
        assert accuracies[p - 1] == pytest.approx(accuracy) and costs[p - 1] == pytest.approx(cost)

    # mode 1 with the stored thresholds reproduces the curve; real exit equals the simulation
    result = evaluate_checkpoint(checkpoint, 1, data=tree, batch_size=3, backend="torchvision", num_threads=0,
                                 real_exit=True, real_exit_points=(10, 30), log=None)
    assert result.budgeted_batch_classification[1] == pytest.approx(accuracies)
    assert result.budgeted_batch_classification[0] == pytest.approx(costs)
    assert [row.point for row in result.real_exit] == [10, 30]
    for row in result.real_exit:
        assert row.matches_simulation
        assert row.measured_macs == pytest.approx(row.expected_macs)
        assert row.images_per_second > 0
    # without --write the file stays as it was
    written = open(checkpoint, "rb").read()
    assert main(["--checkpoint", checkpoint, "--eval-mode", "1", "--data", tree, "--real-exit",
                 "--real-exit-points", "20"] + COMMON) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "point 20" in out and "differs" not in out
    assert open(checkpoint, "rb").read() == written


def test_arguments_are_checked(setup, capsys):
    _, checkpoint, _ = setup
    assert main(["--checkpoint", checkpoint, "--eval-mode", "1"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["--checkpoint", checkpoint + ".missing", "--eval-mode", "0"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", checkpoint, "--eval-mode", "3"])
