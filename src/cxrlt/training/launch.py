"""How the train stage spreads over devices and nodes: the Trainer's layout from params and,
in a SLURM batch job, the `srun` command that starts one training process per task.

DVC runs a stage as one process, but Lightning on SLURM never starts processes itself: it
expects every DDP process to be a task that `srun` started (rank from SLURM_PROCID). So when
the one DVC process of an sbatch job runs the train stage in an allocation of more than one
task, the stage re-runs itself under `srun` (`--nodes=train.num_nodes`,
`--ntasks-per-node=train.devices`), waits, and exits with srun's status. Rank 0, the first task
on the first node, writes the checkpoint and the dvclive logs on the shared filesystem, where
DVC then finds them. Without SLURM nothing changes: on one machine Lightning starts its own
processes (devices > 1), and under torchrun it joins torchrun's.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlt.errors import DataError

# Set in the environment of the tasks srun starts: they train; they do not re-launch.
LAUNCHED = "CXRLT_SRUN_LAUNCHED"
# Optional prefix of each task's command, e.g. "apptainer exec --nv cxrlt.sif" when DVC runs
# inside a container: srun starts tasks on the host, and each must enter the image again.
TASK_WRAPPER = "CXRLT_SRUN_WRAPPER"

# Data-parallel strategies only: selecting the best epoch copies each rank's full state_dict,
# which sharded strategies (FSDP, DeepSpeed) do not hold.
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")


def _precisions() -> tuple[str, ...]:
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    return typing.get_args(_PRECISION_INPUT_STR)


@dataclass(frozen=True)
class Layout:
    """Where and how the train stage trains: the Trainer arguments params.train controls."""

    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    compile: bool = False  # torch.compile the model's training forward (not a Trainer argument)

    @classmethod
    def from_params(cls, tp: Mapping[str, Any]) -> Layout:
        """Checked params.train keys; a wrong value is one line naming the key and the options."""
        accelerator = tp.get("accelerator", "auto")
        if not isinstance(accelerator, str):
            raise DataError(f"params train.accelerator must be a name (auto, cpu, gpu, ...), got {accelerator!r}")
        devices = tp.get("devices", "auto")
        ok = devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1)) or (
            isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices)
        )
        if not ok:
            raise DataError(
                "params train.devices must be auto, a count >= 1, -1 (all) or a list of device "
                f"indices, got {devices!r}"
            )
        num_nodes = tp.get("num_nodes", 1)
        if not _is_int(num_nodes) or num_nodes < 1:
            raise DataError(f"params train.num_nodes must be a whole number >= 1, got {num_nodes!r}")
        strategy = tp.get("strategy", "auto")
        if strategy not in STRATEGIES:
            raise DataError(f"params train.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        precision = str(tp.get("precision", "32-true"))
        if precision not in _precisions():
            raise DataError(f"params train.precision must be one of {list(_precisions())}, got {precision!r}")
        compile_model = tp.get("compile", False)
        if not isinstance(compile_model, bool):
            raise DataError(f"params train.compile must be true or false, got {compile_model!r}")
        return cls(accelerator, devices, int(num_nodes), strategy, precision, compile_model)

    def trainer_kwargs(self, env: Mapping[str, str]) -> dict[str, Any]:
        """Arguments for L.Trainer. Inside a SLURM task, devices "auto" means the tasks per node
        (Lightning requires the two to agree and would otherwise count the node's GPUs)."""
        devices = self.devices
        if devices == "auto" and _lightning_sees_slurm(env):
            devices = _tasks_per_node(env) or 1
        return {
            "accelerator": self.accelerator,
            "devices": devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lightning_sees_slurm(env: Mapping[str, str]) -> bool:
    """Lightning's own rule: SLURM_NTASKS set and the job not named bash/interactive."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _torchrun(env: Mapping[str, str]) -> bool:
    return all(k in env for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """SLURM_NTASKS_PER_NODE, or SLURM_TASKS_PER_NODE ("4(x2)") when every node has the same."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", spec)}
    if len(counts) != 1:
        raise DataError(
            f"SLURM gives nodes different task counts (SLURM_TASKS_PER_NODE={spec}); DDP needs the "
            "same on every node: sbatch --ntasks-per-node=<GPUs per node>"
        )
    return counts.pop()


def srun_command(
    layout: Layout, env: Mapping[str, str], argv: Sequence[str], executable: str
) -> list[str] | None:
    """The command that re-runs `argv` as one task per process under srun, or None when this
    process trains itself (no SLURM batch job, an interactive job, torchrun, a task already
    started by srun, or a one-task allocation). Raises DataError when params ask for more
    nodes or processes per node than the allocation has."""
    if env.get(LAUNCHED) or _torchrun(env) or "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        if layout.num_nodes > 1:
            raise DataError(
                f"params train.num_nodes={layout.num_nodes} in an interactive SLURM job: submit it "
                "with sbatch (containers/slurm/train.sbatch) or start one process per node with torchrun"
            )
        return None  # Lightning ignores SLURM here and starts its own processes
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = _tasks_per_node(env)
    ntasks = int(env.get("SLURM_NTASKS") or (per_node or 1) * nodes)
    devices = layout.devices
    if devices == "auto":
        devices = per_node or 1
    if not _is_int(devices) or devices < 1:
        raise DataError(
            f"params train.devices={layout.devices!r} under SLURM: give the processes per node as a "
            "count (or auto), one per GPU, and allocate as many tasks: sbatch --ntasks-per-node"
        )
    world = layout.num_nodes * devices
    if ntasks == 1 and world == 1:
        return None  # Lightning's SLURM environment runs the single task as it is
    if layout.num_nodes > nodes:
        raise DataError(
            f"params train.num_nodes={layout.num_nodes} but the SLURM job has {nodes} node(s): "
            f"sbatch --nodes={layout.num_nodes}"
        )
    if per_node is None or devices > per_node:
        raise DataError(
            f"params train.devices={devices} processes per node but the SLURM job has "
            f"{per_node or 'no fixed number of'} task(s) per node: sbatch --ntasks-per-node={devices} "
            "(one task per GPU)"
        )
    cmd = [
        "srun",
        f"--nodes={layout.num_nodes}",
        f"--ntasks={world}",
        f"--ntasks-per-node={devices}",
        "--kill-on-bad-exit=1",  # one rank failing ends the step instead of hanging the others
        f"--export=ALL,{LAUNCHED}=1",
    ]
    if env.get("SLURM_CPUS_PER_TASK"):  # srun no longer inherits it from sbatch
        cmd.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    wrapper = shlex.split(env.get(TASK_WRAPPER, ""))
    script = str(Path(argv[0]).resolve())
    return [*cmd, *wrapper, executable, script, *argv[1:]]


def relaunch_under_srun(tp: Mapping[str, Any], env: Mapping[str, str]) -> int | None:
    """Run this script under srun when the SLURM allocation calls for it; srun's exit status,
    or None when this process should train itself."""
    cmd = srun_command(Layout.from_params(tp), env, sys.argv, sys.executable)
    if cmd is None:
        return None
    print("train: " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)
