"""What the restructuring promised: today's checkpoints load, config kinds are typed variants, the caller's
config is never changed, errors are the package's own, the notebook's matplotlib backend is left alone,
and the benchmarks use public names only."""

import ast
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, tiny_overrides

import flows
from flows.config import load_config, to_dict
from flows.errors import ConfigError, FlowsError, SolverError
from flows.nn import MLPSettings, PotentialSettings, TimeMLP, UNetSettings
from flows.objectives import FMSettings, MLESettings, build_objective
from flows.ode import solve

OLD = ROOT / "tests" / "data" / "flows1_mlp_30b4a48.safetensors"  # written by flows at 30b4a48 (flat configs)


def test_a_checkpoint_of_the_previous_layout_loads_and_scores_as_it_did():
    model = flows.load(OLD)
    assert isinstance(model.config.model, MLPSettings) and model.config.model.hidden == [8, 8]
    assert model.step == 7 and model.solver["atol"] == 1e-4 and model.config.run_dir == "runs/old"
    x = torch.tensor([[0.1, 0.2], [1.0, -2.0], [3.0, 0.5]])
    # the log-densities flows 30b4a48 gave for this file (dopri5 1e-4, exact trace)
    expected = torch.tensor([-3.6457626602223177, -3.9211008331349153, -4.911809422688748], dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x), expected, atol=1e-5, rtol=1e-6)


def test_init_from_a_checkpoint_of_the_previous_layout(tmp_path):
    run = flows.train(None, overrides=[*tiny_overrides(tmp_path / "r", steps=0), f"train.init_from={OLD}"])
    started, source = flows.load(run, weights="model"), flows.load(OLD)
    for a, b in zip(started.field.parameters(), source.field.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_and_objective_are_typed_by_their_kind():
    cfg = load_config(None, ["model.name=unet", "objective.name=fm", "objective.coupling=ot"])
    assert isinstance(cfg.model, UNetSettings) and isinstance(cfg.objective, FMSettings)
    assert set(to_dict(cfg.model)) == {"name", "channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                                       "groups", "augment"}  # fmt: skip
    cfg = load_config(None, ["model.name=potential", "model.rank=3"])
    assert isinstance(cfg.model, PotentialSettings) and cfg.model.rank == 3 and isinstance(cfg.objective, MLESettings)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.chanels'. Did you mean 'model.channels'"):
        load_config(None, ["model.chanels=4"])
    with pytest.raises(ConfigError, match="model.name: unknown value 'unnet'. Did you mean 'unet'"):
        load_config(None, ["model.name=unnet"])


def test_a_key_of_another_kind_is_ignored_with_a_one_line_notice(capsys):
    cfg = load_config(None, ["model.channels=16", "objective.coupling=independent"])
    err = capsys.readouterr().err
    assert "notice: model.channels is a setting of model.name=unet; ignored with model.name=mlp." in err
    assert "coupling" not in err  # a key that holds its kind's default is dropped silently (old files wrote all)
    assert isinstance(cfg.model, MLPSettings) and not hasattr(cfg.model, "channels")


def test_load_config_leaves_the_callers_dict_alone():
    mine = {"train": {"steps": 5}, "model": {"hidden": [4, 4]}}
    snapshot = {"train": {"steps": 5}, "model": {"hidden": [4, 4]}}
    cfg = load_config(mine, ["train.steps=9", "model.hidden=[2]"], {"train": {"lr": 0.5}})
    assert (cfg.train.steps, cfg.model.hidden, cfg.train.lr) == (9, [2], 0.5)
    assert mine == snapshot


def test_the_core_raises_the_packages_own_errors():
    field, x = TimeMLP(2, [4]), torch.randn(3, 2)
    with pytest.raises(ConfigError, match="Jacobian regularizer needs"):  # not a solver failure to skip
        solve(field, x, 0.0, 1.0, jacobian=True)
    with pytest.raises(ConfigError, match="HJB penalty needs"):
        solve(field, x, 0.0, 1.0, hjb=True)
    with pytest.raises(ConfigError, match="probe: unknown value 'gauss'"):
        solve(field, x, 0.0, 1.0, trace="hutchinson", probe="gauss")
    with pytest.raises(ConfigError, match="Did you mean 'rk4'"):
        solve(field, x, 0.0, 1.0, method="rk5")
    with pytest.raises(ConfigError, match="unknown solver option"):
        solve(field, x, 0.0, 1.0, tol=1e-3)
    with pytest.raises(ConfigError, match="torch.compile is not available for maximum likelihood"):
        build_objective(field, MLESettings(), {}, compile=True)
    assert issubclass(ConfigError, FlowsError) and issubclass(SolverError, FlowsError)


def test_importing_the_pictures_leaves_the_matplotlib_backend_alone():
    code = (
        "import matplotlib; matplotlib.use('svg')\nimport flows.plotting, flows.report\nprint(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "svg"


def private_names() -> set[str]:
    """Names that start with one underscore defined anywhere in the package (functions, methods, attributes)."""
    names = set()
    for path in (ROOT / "flows").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "name", None) or (node.attr if isinstance(node, ast.Attribute) else None)
            if isinstance(name, str) and name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return names


def test_benchmarks_use_public_names_of_the_package_only():
    private, found = private_names(), []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flows"):
                found += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found
    assert {"_batches", "_Dynamics"}.isdisjoint(private)  # what the benchmarks used to reach for is public now
    tree = ast.parse((ROOT / "flows" / "training" / "accelerator.py").read_text())
    assert "_reset_state" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    elsewhere = [p.name for p in [*(ROOT / "flows").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
                 if "_reset_state" in p.read_text() and p.name != "accelerator.py"]  # fmt: skip
    assert not elsewhere, elsewhere


def test_resume_without_a_directory_continues_the_recipes_run_with_the_recipe(tmp_path):
    from flows.cli.train import main as train_main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), "train": {"steps": 2}}))
    overrides = [o for o in tiny_overrides(tmp_path / "r", steps=2) if not o.startswith(("run_dir", "train.steps"))]
    train_main(["--config", str(recipe), *overrides])
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), "train": {"steps": 3}}))  # train longer
    train_main(["--config", str(recipe), *overrides, "--resume"])  # (a bare --resume goes last)
    assert flows.load(tmp_path / "r").step == 3


def test_a_file_without_a_run_config_loads_and_the_clis_ask_for_data(tmp_path, capsys):
    from flows.cli.evaluate import main as evaluate_main
    from flows.flowfile import write
    from flows.preprocess import Preprocess

    field = TimeMLP(2, [4])
    pre = Preprocess(torch.tensor(0.0), torch.tensor(1.0))
    state = field.state_dict()
    path = write(
        tmp_path / "model.safetensors",
        model_state=state,
        ema_state={f"module.{k}": v for k, v in state.items()},
        preprocess=pre,
        field=to_dict(MLPSettings(hidden=[4])),
        solver={"method": "rk4", "step_size": 0.5},
        shape=(2,),
        step=1,
    )
    model = flows.load(path)
    assert model.config is None and model.solver["method"] == "rk4" and model.log_prob(torch.zeros(3, 2)).shape == (3,)
    with pytest.raises(SystemExit):
        evaluate_main([str(path)])
    assert "carries no run config" in capsys.readouterr().err


def test_the_package_offers_its_public_names_and_submodules_by_import():
    import subprocess
    import sys

    assert flows.fit and flows.config.load_config is load_config  # an imported submodule is an attribute, as always
    with pytest.raises(AttributeError, match=r"no attribute 'nothing'.*flows.__all__"):
        flows.nothing  # noqa: B018
    # in a fresh process, a bare ``import flows`` offers __all__; a submodule needs its import
    code = "import flows\ntry:\n    flows.evaluation\nexcept AttributeError:\n    print('refused')\nflows.fit"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "refused"
    assert set(flows.__all__) <= set(dir(flows))
