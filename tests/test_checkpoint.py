import pickle

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import flows
from flows.build import export
from flows.config import Config
from flows.data import Preprocess
from flows.errors import CheckpointError
from flows.nn import build_field


def make(tmp_path):
    cfg = Config()
    cfg.model.hidden = [8, 8]
    field = build_field(cfg.model, 2)
    ema = AveragedModel(field, use_buffers=True)
    pre = Preprocess(torch.tensor(0.5), torch.tensor(2.0))
    return export(tmp_path / "model.safetensors", cfg, field, ema, pre, (2,), 7), field


def test_round_trip_gives_identical_outputs(tmp_path):
    path, field = make(tmp_path)
    loaded = flows.load(tmp_path, weights="model")
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(loaded.field(x, t), field(x, t), atol=0, rtol=0)
    assert loaded.step == 7 and loaded.config.model.hidden == [8, 8]
    assert float(loaded.preprocess.scale) == 2.0


def test_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        flows.load(bad)
    torch.save({"x": Exploit()}, tmp_path / "zip.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        flows.load(tmp_path / "zip.pt")
    assert not marker.exists()


def test_truncated_and_missing_files_are_refused(tmp_path):
    path, _ = make(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        flows.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        flows.load(tmp_path / "elsewhere")


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_valid_file_whose_header_length_looks_like_a_pickle_is_accepted(tmp_path, first_bytes):
    """Regression: the 8-byte header length of a real checkpoint can start with 0x80 or 'PK'."""
    cfg = Config()
    cfg.model.hidden = [8, 8]
    field = build_field(cfg.model, 2)
    ema = AveragedModel(field, use_buffers=True)
    pre = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
    target = int.from_bytes(first_bytes, "little")  # the header length's low bytes we want
    path = export(tmp_path / "model.safetensors", cfg, field, ema, pre, (2,), 0)
    base = int.from_bytes(path.read_bytes()[:8], "little")
    start = (target - base) % (256 ** len(first_bytes))  # each run_dir character adds one header byte
    for pad in range(max(start - 16, 0), start + 16):
        cfg.run_dir = "r" * pad
        path = export(tmp_path / "model.safetensors", cfg, field, ema, pre, (2,), 0)
        if path.read_bytes()[: len(first_bytes)] == first_bytes:
            break
    else:
        pytest.fail("could not build such a header")
    assert flows.load(path).config.run_dir == cfg.run_dir
