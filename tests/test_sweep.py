"""grft_lightning.experiments.sweep: planning, skipping finished runs, failures, and the three launch modes.

The runs go through a small stand-in for train.py (``fake_train.py``, written per test) that
reads the same arguments and writes a results.json.
"""

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from grft_lightning.experiments import report, sweep, tables
from grft_lightning.experiments.tables import FGVC_DATASETS, VTAB_COLUMNS

FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    args = sys.argv[1:]
    assert args[0] == "fit", args
    configs = [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
    seed = int(args[args.index("--seed_everything") + 1])
    run_dir = Path(args[args.index("--run_dir") + 1])
    if str(seed) == os.environ.get("FAKE_TRAIN_FAIL_SEED"):
        sys.exit(3)
    task, method = Path(configs[0]), Path(configs[1]).stem
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"method": method, "dataset": f"{task.parent.name}/{task.stem}", "seed": seed,
              "test_acc": 0.5 + seed / 100, "tuned_pct": 0.3, "argv": args}
    (run_dir / "results.json").write_text(json.dumps(record))
""")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for suite, tasks in (("vtab", VTAB_COLUMNS), ("fgvc", FGVC_DATASETS)):
        (root / "configs" / suite).mkdir(parents=True)
        (root / "configs" / suite / "base.yaml").write_text("trainer: {max_epochs: 1}\n")
        for task in tasks:
            (root / "configs" / suite / f"{task}.yaml").write_text("config: base.yaml\n")
    (root / "configs" / "methods").mkdir()
    for method in ("grft", "gps"):
        (root / "configs" / "methods" / f"{method}.yaml").write_text("model: {}\n")
    (root / "fake_train.py").write_text(FAKE_TRAIN)
    return root


def test_plan_runs_commands(repo):
    runs = sweep.plan_runs(["fgvc"], ["grft", "gps"], [0, 1], repo / "runs",
                           ["--trainer.max_epochs", "1"], root=repo)
    assert len(runs) == 5 * 2 * 2
    assert [(r.task, r.method, r.seed) for r in runs[:4]] == [
        ("cub", "grft", 0), ("cub", "grft", 1), ("cub", "gps", 0), ("cub", "gps", 1)]
    assert runs[0].command("python") == [
        "python", "train.py", "fit", "--config", "configs/fgvc/cub.yaml",
        "--config", "configs/methods/grft.yaml", "--label", "grft", "--seed_everything", "0",
        "--run_dir", "runs/fgvc/cub/grft/seed0", "--trainer.max_epochs", "1"]
    assert runs[-1].run_dir == "runs/fgvc/cars/gps/seed1"


def test_vtab_suite_is_the_19_tasks_in_order_without_base(repo):
    runs = sweep.plan_runs(["vtab"], ["grft"], [0], repo / "runs", root=repo)
    assert [r.task for r in runs] == VTAB_COLUMNS


def test_config_paths_and_folders_as_suites(repo):
    runs = sweep.plan_runs([str(repo / "configs/vtab/dtd.yaml"), "configs/fgvc/cub.yaml"],
                           ["gps"], [3], repo / "runs", root=repo)
    assert [(r.suite, r.task, r.run_dir) for r in runs] == [
        ("vtab", "dtd", "runs/vtab/dtd/gps/seed3"), ("fgvc", "cub", "runs/fgvc/cub/gps/seed3")]
    (repo / "configs/offline").mkdir()
    (repo / "configs/offline/mnist.yaml").write_text("{}\n")
    assert [r.task for r in sweep.plan_runs(["configs/offline"], ["gps"], [0], root=repo)] == \
        ["mnist"]


def test_missing_configs_are_named(repo):
    with pytest.raises(sweep.SweepError, match=r"'lora'.*available.*gps, grft"):
        sweep.plan_runs(["fgvc"], ["lora"], [0], root=repo)
    with pytest.raises(sweep.SweepError, match=r"'offline' has no configs"):
        sweep.plan_runs(["offline"], ["grft"], [0], root=repo)
    (repo / "configs/vtab/dmlab.yaml").unlink()
    with pytest.raises(sweep.SweepError, match=r"lacks configs/vtab/dmlab.yaml"):
        sweep.plan_runs(["vtab"], ["grft"], [0], root=repo)


def test_pending_skips_runs_with_results(repo):
    runs = sweep.plan_runs(["fgvc"], ["grft"], [0], repo / "runs", root=repo)
    done = repo / runs[1].run_dir
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    assert sweep.pending(runs, root=repo) == runs[:1] + runs[2:]


def test_failed_run_is_reported_and_the_sweep_goes_on(repo, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_FAIL_SEED", "1")
    runs = sweep.plan_runs(["configs/fgvc/cub.yaml"], ["grft"], [0, 1, 2], repo / "runs",
                           root=repo)
    assert sweep.run_local(runs, repo, sys.executable, "fake_train.py") == 1
    out = capsys.readouterr().out
    assert "runs/fgvc/cub/grft/seed1: failed (exit 3)" in out
    assert "runs/fgvc/cub/grft/seed2: ok" in out
    assert "3 runs, 0 skipped, 2 ok, 1 failed" in out
    assert sweep.pending(runs, root=repo) == [runs[1]]


def test_local_sweep_end_to_end_and_relaunch(repo, capsys):
    argv = ["--suite", "configs/fgvc/cub.yaml", "--methods", "grft", "--seeds", "0", "1",
            "--runs-dir", str(repo / "runs"), "--root", str(repo),
            "--train-script", "fake_train.py", "--extra", "--trainer.max_epochs 1"]
    assert sweep.main(argv) == 0
    results = tables.load_results(repo / "runs")
    assert [r["seed"] for r in results] == [0, 1]
    assert results[0]["argv"][-2:] == ["--trainer.max_epochs", "1"]
    cub = tables.summarize(results)["fgvc"].rows[0].cells["cub"]
    assert cub.mean == pytest.approx(50.5) and cub.std == pytest.approx(2 ** 0.5 / 2)

    capsys.readouterr()
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skip runs/fgvc/cub/grft/seed") == 2
    assert "2 runs, 2 skipped, 0 ok, 0 failed" in out


def test_local_sweep_exit_code_on_failure(repo, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_FAIL_SEED", "0")
    argv = ["--suite", "configs/fgvc/cub.yaml", "--methods", "gps", "--runs-dir",
            str(repo / "runs"), "--root", str(repo), "--train-script", "fake_train.py"]
    assert sweep.main(argv) == 1


def test_dry_run_writes_nothing(repo, capsys):
    argv = ["--suite", "fgvc", "--methods", "grft", "--runs-dir", str(repo / "runs"),
            "--root", str(repo), "--mode", "slurm", "--dry-run"]
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("todo ") == 5
    assert not (repo / "runs").exists()


def test_slurm_mode_writes_an_array_of_pending_runs(repo, capsys):
    runs_dir = repo / "runs"
    done = runs_dir / "fgvc/cub/grft/seed0"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    argv = ["--suite", "fgvc", "--methods", "grft", "--seeds", "0", "--runs-dir", str(runs_dir),
            "--root", str(repo), "--mode", "slurm", "--slurm-gpus", "2",
            "--sbatch-option=--account=abc"]
    assert sweep.main(argv) == 0
    assert "sbatch " in capsys.readouterr().out
    [script] = (runs_dir / "slurm").glob("*.sbatch")
    [runs_file] = (runs_dir / "slurm").glob("*.runs")
    text = script.read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --account=abc"):
        assert line in text.splitlines(), line
    assert 'srun "$PYTHON" train.py "${ARGS[@]:1}" --trainer.devices 2' in text
    lines = [shlex.split(line) for line in runs_file.read_text().splitlines()]
    assert [line[0] for line in lines] == [f"runs/fgvc/{d}/grft/seed0" for d in FGVC_DATASETS[1:]]
    assert lines[0][1:] == sweep.plan_runs(["fgvc"], ["grft"], [0], runs_dir, root=repo)[1].args
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_wandb_mode_and_agent_run(repo, capsys):
    argv = ["--suite", "configs/vtab/dtd.yaml", "configs/vtab/svhn.yaml", "--methods", "grft",
            "gps", "--seeds", "0", "1", "--runs-dir", str(repo / "runs"), "--root", str(repo),
            "--mode", "wandb", "--extra", "--trainer.max_epochs 1"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "wandb sweep" in out and "wandb agent" in out
    [path] = (repo / "runs" / "wandb").glob("*.yaml")
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "train.py" and spec["method"] == "grid"
    assert spec["parameters"]["task_config"]["values"] == ["configs/vtab/dtd.yaml",
                                                           "configs/vtab/svhn.yaml"]
    assert spec["parameters"]["method_config"]["values"] == ["configs/methods/grft.yaml",
                                                             "configs/methods/gps.yaml"]
    assert spec["parameters"]["seed"]["values"] == [0, 1]
    command = spec["command"]
    assert "${args}" in command and command[-2:] == ["--trainer.max_epochs", "1"]

    # What a W&B agent runs for one grid point (its ${args} expanded):
    agent_argv = command[command.index("agent-run") + 1:]
    position = agent_argv.index("${args}")
    agent_argv[position:position + 1] = ["--task_config=configs/vtab/svhn.yaml",
                                         "--method_config=configs/methods/gps.yaml", "--seed=1"]
    run, train = sweep.agent_command(agent_argv, root=repo)
    assert run == sweep.plan_runs(["configs/vtab/svhn.yaml"], ["gps"], [1], repo / "runs",
                                  ["--trainer.max_epochs", "1"], root=repo)[0]
    assert train[1:] == ["train.py", *run.args]


@pytest.mark.parametrize("content, done", [
    ('{"method": "grft", "seed": 0}', True),
    ("{}", True),
    ('{"method": "grft", "se', False),  # truncated
    ("", False),
    ("[1, 2]", False),
    (b"\xff\xfe\x00garbage", False),
])
def test_only_a_readable_results_file_marks_a_run_done(repo, content, done):
    [run] = sweep.plan_runs(["configs/fgvc/cub.yaml"], ["grft"], [0], repo / "runs", root=repo)
    path = repo / run.run_dir / "results.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run.done(repo) is done
    assert sweep.pending([run], root=repo) == ([] if done else [run])


def test_a_truncated_results_file_is_run_again(repo, capsys):
    argv = ["--suite", "configs/fgvc/cub.yaml", "--methods", "grft", "--seeds", "0",
            "--runs-dir", str(repo / "runs"), "--root", str(repo), "--train-script", "fake_train.py"]
    results = repo / "runs/fgvc/cub/grft/seed0/results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"method": "grft", "dataset": "fgvc/cu')
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "0 done, 1 pending" in out and "1 runs, 0 skipped, 1 ok, 0 failed" in out
    assert json.loads(results.read_text())["seed"] == 0


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_the_slurm_array_skips_only_readable_results(repo, tmp_path):
    runs_dir = repo / "runs"
    argv = ["--suite", "configs/fgvc/cub.yaml", "--methods", "grft", "gps", "--seeds", "0",
            "--runs-dir", str(runs_dir), "--root", str(repo), "--mode", "slurm"]
    assert sweep.main(argv) == 0
    [script] = (runs_dir / "slurm").glob("*.sbatch")
    bin_dir = tmp_path / "bin"  # srun stands in for the launcher: it prints what it would run
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\necho \"srun $*\"\n")
    (bin_dir / "srun").chmod(0o755)
    (runs_dir / "fgvc/cub/grft/seed0").mkdir(parents=True)
    (runs_dir / "fgvc/cub/grft/seed0/results.json").write_text("{}")
    (runs_dir / "fgvc/cub/gps/seed0").mkdir(parents=True)
    (runs_dir / "fgvc/cub/gps/seed0/results.json").write_text('{"trunc')
    outputs = []
    for index in (0, 1):
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(index), "PYTHON": sys.executable}
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0].startswith("skip runs/fgvc/cub/grft/seed0")
    assert outputs[1].startswith("srun ") and "runs/fgvc/cub/gps/seed0" in outputs[1]
