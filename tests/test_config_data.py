import numpy as np
import pytest
import torch
from helpers import ROOT

from flows.config import DataConfig, load_config
from flows.data import bits_per_dim, build_data, load_array
from flows.errors import ConfigError, DataError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: 5\nmodel:\n  hidden: [8, 8]\n")
    cfg = load_config(path, ["train.steps=7", "objective.kinetic=0.01", "solver.step_size=null"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7 and cfg.model.hidden == [8, 8]
    assert cfg.objective.kinetic == 0.01 and cfg.solver.step_size is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'. Did you mean 'train.lr'"),
        (["trian.lr=1"], "Did you mean 'train'"),
        (["train.steps=ten"], "'train.steps' expects int"),
        (["model.hidden=5"], "expects a list"),
        (["model.activation=relu"], "unknown value 'relu'"),
        (["data.name=checkerbord"], "Did you mean 'checkerboard'"),
        (["train.batch_size=0"], "train.batch_size must be > 0"),
        (["solver.atol=-1"], "solver.atol"),
        (["data.name=tabular"], "data.path"),
        (["novalue"], "key=value"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_toy_data_is_seeded_and_test_differs():
    a = build_data(DataConfig(train_size=100, test_size=50))
    b = build_data(DataConfig(train_size=100, test_size=50))
    torch.testing.assert_close(a.train, b.train)
    assert not torch.allclose(a.train[:50], a.test)
    assert a.train.shape == (100, 2)


def test_tabular_standardizes_and_counts_the_log_det(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal([1.0, -3.0, 10.0], [2.0, 0.5, 4.0], size=(500, 3))
    np.save(tmp_path / "t.npy", values)
    data = build_data(DataConfig(name="tabular", path=str(tmp_path / "t.npy")))
    x = data.preprocess(data.train)
    torch.testing.assert_close(x.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    # log p_data = log p_model + log_det, log_det = −Σ log σ
    expected = -np.log(data.train.std(0).double().numpy()).sum()
    assert data.preprocess.log_det(torch.zeros(1, 3)).item() == pytest.approx(expected)


def test_nan_rows_are_refused_with_the_first_bad_row(tmp_path):
    values = np.ones((10, 2))
    values[3, 1] = np.nan
    values[7, 0] = np.inf
    np.save(tmp_path / "bad.npy", values)
    with pytest.raises(DataError, match="first bad row 3"):
        load_array(tmp_path / "bad.npy")
    with pytest.raises(DataError, match="does not exist"):
        load_array(tmp_path / "nope.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    with pytest.raises(DataError, match="non-empty"):
        load_array(tmp_path / "empty.npy")


def test_digits_dequantize_into_unit_interval():
    data = build_data(DataConfig(name="digits"))
    assert data.dim == 64 and data.preprocess.levels == 17
    y = data.preprocess.inverse(data.preprocess(data.train))
    assert y.min() >= 0 and y.max() <= 1 + 1e-6  # float32 round trip of values just below 1
    assert len(data.train) + len(data.test) == 1797
    assert bits_per_dim(0.0, 64, 256) == pytest.approx(8.0)


SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "idx": (1, 28, 28), "tabular": (6,)}


def cfg_needs_path(path) -> bool:
    return path.name.startswith(("tabular", "posterior"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_network(path):
    from flows.nn import build_field

    cfg = load_config(path, ["data.path=x.npy"] if cfg_needs_path(path) else [])
    digits = (1, 8, 8) if cfg.data.image else (64,)
    shape = SHAPES.get(cfg.data.name, digits if cfg.data.name == "digits" else (2,))
    if cfg.data.labels:  # class-conditional: the field takes labels
        from flows.context import Context

        field = build_field(cfg.model, shape, Context("labels", classes=10))
        x = torch.zeros(2, *shape)
        assert field(x, torch.rand(2), torch.tensor([0, 10])).shape == x.shape
        return
    field = build_field(cfg.model, shape)
    x = torch.zeros(2, *shape)
    assert field(x, torch.rand(2)).shape == x.shape


def test_batches_split_over_processes_and_resume_from_any_step():
    from flows.data.batches import Batches

    data = torch.arange(50.0)[:, None]
    one = Batches(data, 8, seed=3)
    two = [Batches(data, 8, seed=3, rank=r, world=2) for r in range(2)]
    assert len(one) == 6
    it1, it2 = one.from_step(0), [b.from_step(0) for b in two]
    seen = []
    for _ in range(12):  # two epochs
        batch = next(it1)
        assert torch.equal(torch.cat([next(i) for i in it2]), batch)
        seen.append(batch)
    assert len(torch.cat(seen[:6]).unique()) == 48  # an epoch never repeats a row
    assert not torch.equal(seen[0], seen[6])  # reshuffled each epoch
    resumed = one.from_step(5)
    assert all(torch.equal(next(resumed), seen[k]) for k in range(5, 12))


def test_unquoted_no_is_the_option_no_not_false():
    """YAML 1.1 reads `no` as false; `train.mixed_precision=no` must still mean 'no'."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_solver_methods_are_torchdiffeqs():
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    from flows.ode import FIXED_STEP_METHODS, SOLVER_METHODS

    assert set(SOLVER_METHODS) == set(SOLVERS) - {"scipy_solver"}
    fixed = {name for name, solver in SOLVERS.items() if issubclass(solver, FixedGridODESolver)}
    assert set(FIXED_STEP_METHODS) == fixed  # these take a step size, the others tolerances
