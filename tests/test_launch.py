"""Train stage layout: params checked, SLURM allocations turned into the right srun command.

No srun runs here: the SLURM batch environment is a dict of the variables sbatch sets.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrlt.errors import DataError
from cxrlt.training.launch import LAUNCHED, TASK_WRAPPER, Layout, srun_command

ARGV = ["stages/train.py"]


def _batch(nodes: int, per_node: int, **extra: str) -> dict[str, str]:
    """What sbatch --nodes=N --ntasks-per-node=T sets in the batch script's environment."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "cxrlt-train",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
        "SLURM_NODELIST": "gpu[01-02]",
        **extra,
    }


def _layout(**train) -> Layout:
    return Layout.from_params(train)


def test_defaults_are_the_single_process_run_of_before():
    """The demo's Trainer arguments: what fit.py passed before num_nodes/strategy were params."""
    assert _layout().trainer_kwargs({}) == {
        "accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto", "precision": "32-true",
    }  # fmt: skip
    assert srun_command(_layout(), {}, ARGV, "python") is None


def test_two_nodes_of_four_gpus_become_one_srun_step_of_eight_tasks():
    layout = _layout(accelerator="gpu", devices=4, num_nodes=2, strategy="ddp")
    cmd = srun_command(layout, _batch(2, 4, SLURM_CPUS_PER_TASK="8"), ARGV, "/opt/venv/bin/python")
    assert cmd is not None
    script = cmd.index("/opt/venv/bin/python")
    assert cmd[0] == "srun" and cmd[script + 1].endswith("/stages/train.py")
    opts = cmd[1:script]
    assert {"--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8"} <= set(opts)
    assert f"--export=ALL,{LAUNCHED}=1" in opts  # the tasks train instead of launching again
    assert "--kill-on-bad-exit=1" in opts


def test_devices_auto_takes_the_tasks_per_node_and_a_node_subset_is_allowed():
    cmd = srun_command(_layout(devices="auto", num_nodes=1), _batch(2, 4), ARGV, "python")
    assert cmd is not None and {"--nodes=1", "--ntasks=4", "--ntasks-per-node=4"} <= set(cmd)


def test_uneven_task_layout_from_slurm_tasks_per_node():
    env = _batch(2, 4)
    del env["SLURM_NTASKS_PER_NODE"]  # sbatch --ntasks=8 without --ntasks-per-node
    env["SLURM_TASKS_PER_NODE"] = "4(x2)"
    assert srun_command(_layout(num_nodes=2), env, ARGV, "python") is not None
    env["SLURM_TASKS_PER_NODE"] = "5,3"
    with pytest.raises(DataError, match=r"different task counts.*5,3"):
        srun_command(_layout(num_nodes=2), env, ARGV, "python")


def test_a_container_wrapper_runs_each_task_inside_the_image():
    env = _batch(2, 2, **{TASK_WRAPPER: "apptainer exec --nv '/scratch/my images/cxrlt.sif'"})
    cmd = srun_command(_layout(devices=2, num_nodes=2), env, ARGV, "/opt/venv/bin/python")
    assert cmd is not None
    i = cmd.index("apptainer")
    assert cmd[i : i + 5] == ["apptainer", "exec", "--nv", "/scratch/my images/cxrlt.sif", "/opt/venv/bin/python"]
    assert shlex.split(shlex.join(cmd)) == cmd


@pytest.mark.parametrize(
    ("env", "train"),
    [
        ({}, {"devices": 2, "strategy": "ddp"}),  # one machine: Lightning starts its own processes
        (_batch(2, 4, **{LAUNCHED: "1", "SLURM_PROCID": "5"}), {"devices": 4, "num_nodes": 2}),  # a task
        (_batch(1, 1), {}),  # a one-task job: Lightning's SLURM environment runs it as it is
        ({**_batch(1, 4), "SLURM_JOB_NAME": "interactive"}, {"devices": 4}),  # Lightning ignores SLURM
        ({**_batch(2, 4), "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"},
         {"devices": 4, "num_nodes": 2}),  # torchrun inside an allocation: torchrun's processes
    ],
)  # fmt: skip
def test_no_relaunch(env, train):
    assert srun_command(_layout(**train), env, ARGV, "python") is None


def test_one_process_in_a_many_task_job_still_goes_through_srun():
    """Lightning in the batch step would see SLURM_NTASKS=4 and wait for 3 ranks that never come."""
    cmd = srun_command(_layout(devices=1), _batch(1, 4), ARGV, "python")
    assert cmd is not None and {"--nodes=1", "--ntasks=1", "--ntasks-per-node=1"} <= set(cmd)


@pytest.mark.parametrize(
    ("env", "train", "message"),
    [
        (_batch(1, 4), {"num_nodes": 2, "devices": 4}, r"num_nodes=2 but the SLURM job has 1 node.*--nodes=2"),
        (_batch(2, 2), {"num_nodes": 2, "devices": 4}, r"devices=4 .* 2 task\(s\) per node.*--ntasks-per-node=4"),
        (_batch(1, 1), {"devices": 4}, r"--ntasks-per-node=4"),
        (_batch(2, 4), {"num_nodes": 2, "devices": [0, 1]}, r"train.devices=\[0, 1\] under SLURM"),
        ({**_batch(2, 4), "SLURM_JOB_NAME": "bash"}, {"num_nodes": 2}, r"interactive SLURM job: submit it with sbatch"),
    ],
)  # fmt: skip
def test_allocation_that_cannot_hold_the_layout_is_one_clear_error(env, train, message):
    with pytest.raises(DataError, match=message):
        srun_command(_layout(**train), env, ARGV, "python")


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"num_nodes": 0}, r"train.num_nodes must be a whole number >= 1, got 0"),
        ({"num_nodes": "2"}, r"train.num_nodes must be a whole number"),
        ({"num_nodes": True}, r"train.num_nodes must be a whole number"),
        ({"strategy": "fsdp"}, r"train.strategy must be one of \['auto', 'ddp'"),
        ({"devices": 0}, r"train.devices must be auto, a count >= 1"),
        ({"devices": []}, r"train.devices must be auto"),
        ({"precision": "16"}, r"train.precision must be one of .*'bf16-mixed'"),
        ({"accelerator": 1}, r"train.accelerator must be a name"),
    ],
)
def test_bad_layout_params_are_one_line_errors(train, message):
    with pytest.raises(DataError, match=message):
        _layout(**train)


def test_inside_a_task_devices_auto_is_the_tasks_per_node_and_lightning_agrees():
    """Lightning checks devices and num_nodes against SLURM's; the resolved values must pass."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = _batch(2, 4, **{LAUNCHED: "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    kwargs = _layout(accelerator="gpu", num_nodes=2, strategy="ddp").trainer_kwargs(env)
    assert kwargs["devices"] == 4 and kwargs["num_nodes"] == 2
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        assert SLURMEnvironment.detect()
        slurm = SLURMEnvironment()
        slurm.validate_settings(kwargs["devices"], kwargs["num_nodes"])  # raises on a mismatch
        assert (slurm.world_size(), slurm.global_rank(), slurm.local_rank(), slurm.node_rank()) == (8, 5, 1, 1)


def test_the_train_stage_relaunches_before_loading_data(tmp_path: Path):
    """stages/train.py asks the launcher first (no manifest or cache exists here): a stand-in
    srun on PATH (there is no SLURM on this machine) records its arguments."""
    from cxrlt.params import load_params

    root = Path(__file__).resolve().parents[1]
    params = load_params(root / "params.yaml")
    params["train"].update({"devices": 2, "num_nodes": 2, "accelerator": "cpu", "strategy": "ddp"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "srun"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/srun.args\nexit 3\n')
    fake.chmod(0o755)
    env = {**os.environ, **_batch(2, 2), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, str(root / "stages" / "train.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 3, res.stderr[-2000:]  # srun's status is the stage's
    args = (tmp_path / "srun.args").read_text().split()
    assert args[:3] == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2"]
    assert args[-1].endswith("stages/train.py") and args[-2] == sys.executable
