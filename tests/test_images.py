"""Image data: preprocessing log-dets against autograd, torchvision's on-disk layouts, IDX folders,
and a U-Net run trained, sampled and evaluated (bits/dim) end to end."""

import gzip
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from helpers import image_overrides, script

from flows.api import train
from flows.config import DataConfig, load_config
from flows.data import Preprocess, build_data, image_preprocess
from flows.data.images import read_idx_images
from flows.errors import DataError


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess(torch.tensor(0.0), torch.tensor(1.0), 256, logit_alpha=0.05),
        Preprocess(torch.tensor(0.3), torch.tensor(2.0), 17, logit_alpha=1e-6),
        image_preprocess(256, 0.0),
        Preprocess(torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 2.0, 1.5]), None),
    ],
)
def test_dequantization_and_logit_log_det_match_autograd(pre):
    """log|det ∂x/∂y| from Preprocess.log_det equals the log-determinant of the autograd Jacobian."""
    pre = Preprocess(pre.shift.double(), pre.scale.double(), pre.levels, pre.logit_alpha)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, pre.levels or 5, (4, 3), generator=g).double()
    noise = torch.rand(4, 3, generator=g, dtype=torch.float64)
    levels = pre.levels or 1
    y = (raw + noise) / levels if pre.levels else raw + noise  # the reporting space

    def to_model(y1):  # y → x for one sample
        raw1 = y1 * levels if pre.levels else y1
        return pre(raw1[None].double(), noise=torch.zeros(1, 3, dtype=torch.float64))[0].double()

    x = torch.stack([to_model(y[i]) for i in range(4)])
    expected = torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(to_model, y[i]))[1] for i in range(4)]
    )
    torch.testing.assert_close(pre.log_det(x), expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(pre.inverse(x), y, atol=1e-9, rtol=1e-9)


def write_idx(path, images, gz=False):
    n, h, w = images.shape
    data = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, h, w)) + images.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_labels(path, n):
    path.write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))


def test_mnist_loader_reads_torchvisions_layout_without_download(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_labels(raw / f"{split}-labels-idx1-ubyte", n)
    data = build_data(DataConfig(name="mnist", root=str(tmp_path)))
    assert data.train.shape == (12, 1, 28, 28) and data.test.shape == (5, 1, 28, 28)
    assert data.train.dtype == torch.uint8 and data.preprocess.levels == 256
    with pytest.raises(DataError, match="data.download=true"):
        build_data(DataConfig(name="mnist", root=str(tmp_path / "empty")))


def test_cifar10_loader_reads_torchvisions_layout_without_download(tmp_path, monkeypatch):
    """Tiny batches in torchvision's pickle layout; torchvision checks md5 sums, so point it at ours."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sums = {}
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(entry))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    meta_md5 = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    data = build_data(DataConfig(name="cifar10", root=str(tmp_path), logit_alpha=0.05))
    assert data.train.shape == (10, 3, 32, 32) and data.test.shape == (3, 3, 32, 32)
    assert data.preprocess.logit_alpha == 0.05


def test_idx_folder_gzip_split_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, gz=True)
    data = build_data(DataConfig(name="idx", path=str(tmp_path), test_fraction=0.1))
    assert data.shape == (1, 6, 5) and len(data.train) == 18
    assert np.array_equal(data.test[:, 0].numpy(), images[-2:])  # the last rows are held out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x-images-idx3-ubyte").write_bytes((2051).to_bytes(4, "big") + bytes(20))
    with pytest.raises(DataError, match="truncated|not an IDX"):
        read_idx_images(tmp_path / "bad" / "x-images-idx3-ubyte")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*-images"):
        build_data(DataConfig(name="idx", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="not a folder"):
        build_data(DataConfig(name="idx", path=str(tmp_path / "missing")))


def test_digits_as_images():
    data = build_data(DataConfig(name="digits", image=True))
    assert data.shape == (1, 8, 8) and data.preprocess.levels == 17
    x = data.preprocess(data.train)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("objective", ["fm", pytest.param("mle", marks=pytest.mark.slow)])  # mle: test_unet.py
def test_unet_on_digit_images_trains_samples_and_reports_bits_per_dim(tmp_path, objective):
    run_dir = tmp_path / objective
    result = train(load_config(None, image_overrides(run_dir, objective))).result
    assert result["trace"] == "hutchinson" and np.isfinite(result["bpd"])
    assert (run_dir / "samples_grid.png").is_file()
    proc = script("sample.py", str(run_dir), "-n", "16", "--steps", "2", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (16, 1, 8, 8)
    assert (tmp_path / "s" / "samples_grid.png").is_file()
    args = [
        "evaluate.py",
        str(run_dir),
        "--limit",
        "8",
        "--check",
        "0",
        "--method",
        "rk4",
        "--trace",
        "hutchinson",
    ]
    proc = script(*args, "--json", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits/dim" in proc.stdout and json.loads((tmp_path / "e.json").read_text())["trace"] == "hutchinson"
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 8, 8), np.float32))
    proc = script(*args, "--data", str(tmp_path / "rgb.npy"))
    assert proc.returncode != 0 and "channels: got 3, expected 1" in proc.stderr
