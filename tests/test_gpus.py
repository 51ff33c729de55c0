"""GPU claims (cxrlt.gpus) on CPU: fake GPU ids (CXRLT_GPU_IDS) and a temporary lock dir.

Concurrent claims run in real processes, because the lock is the kernel's (flock on an open
file) and what matters is what another process sees, also after a SIGKILL.
"""

from __future__ import annotations

import ast
import fcntl
import importlib.util
import os
import selectors
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrlt.errors import DataError
from cxrlt.gpus import ALL, claim_gpus, claims_gpus, stage_gpus
from cxrlt.stage import run_stage

ROOT = Path(__file__).resolve().parents[1]

# A stage stand-in: claims `count` GPUs, starts a child that tries to claim one GPU at once
# (as Lightning's DDP workers re-run the stage script), prints what both see, holds the GPUs
# until the stop file appears.
HOLDER = """
import logging, os, subprocess, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from cxrlt.gpus import claim_gpus

CHILD = ("import os; from cxrlt.gpus import claim_gpus\\n"
         "with claim_gpus(1, 'child', 'k', timeout_s=0) as ids:\\n"
         "    print(os.environ['CUDA_VISIBLE_DEVICES'], ','.join(ids))")
count, timeout, stop = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with claim_gpus(count, "test", "k", timeout_s=timeout, poll_s=0.05) as ids:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    print("claimed", ",".join(ids), os.environ["CUDA_VISIBLE_DEVICES"],
          child.stdout.strip().replace(" ", "/") or "child-failed:" + child.stderr[-300:], flush=True)
    while not os.path.exists(stop):
        time.sleep(0.02)
"""

_ENV = ("CXRLT_GPU_IDS", "CXRLT_GPU_LOCK_DIR", "CXRLT_GPU_CLAIM", "CXRLT_GPU_WAIT_S",
        "CXRLT_GPUS_HELD", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "RANK", "SLURM_STEP_NUM_TASKS")  # fmt: skip


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean GPU environment for this process: fake ids 0,1 and a lock dir in tmp_path."""
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CXRLT_GPU_IDS", "0,1")
    monkeypatch.setenv("CXRLT_GPU_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


class Holder:
    """One holder process; `stop()` lets it exit normally."""

    def __init__(self, tmp: Path, name: str, count: int = 1, timeout: float = 60.0) -> None:
        script = tmp / "holder.py"
        script.write_text(HOLDER)
        self.stop_file = tmp / f"stop-{name}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(script), str(count), str(timeout), str(self.stop_file)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def line(self, stream: str = "stdout", timeout: float = 60.0) -> str:
        """The next line the holder writes (no timing assumed: the deadline only stops a hang)."""
        f = getattr(self.proc, stream)
        sel = selectors.DefaultSelector()
        sel.register(f, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            raise AssertionError(f"holder wrote nothing to {stream}: {self.proc.communicate()}")
        return f.readline().strip()

    def claimed(self) -> str:
        """The holder's claimed ids, after checking what it and its child see."""
        words = self.line().split()
        assert len(words) == 4 and words[0] == "claimed", words
        _, ids, visible, child = words
        assert visible == ids  # CUDA_VISIBLE_DEVICES in the holder: its claim
        assert child == f"{ids}/{ids}"  # the child sees the same GPUs and claims nothing more
        return ids

    def stop(self) -> None:
        self.stop_file.touch()
        assert self.proc.wait(60) == 0, self.proc.communicate()


@pytest.fixture
def holders(tmp_path: Path, locks: Path):
    started: list[Holder] = []

    def start(name: str, **kwargs) -> Holder:
        h = Holder(tmp_path, name, **kwargs)
        started.append(h)
        return h

    yield start
    for h in started:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def test_concurrent_claims_get_different_gpus_and_a_third_waits_for_one(holders, locks):
    a, b = holders("a"), holders("b")
    gpu_a, gpu_b = a.claimed(), b.claimed()
    assert {gpu_a, gpu_b} == {"0", "1"}
    assert _holder_of(locks, gpu_a) == a.proc.pid  # the lock file names its holder, for people
    c = holders("c")
    waiting = c.line("stderr")  # every GPU is busy: it says so, naming the holders and the lock dir
    assert "waiting for 1 free GPU(s) of 0,1" in waiting, waiting
    for h in (a, b):
        assert f"pid {h.proc.pid} on " in waiting and "stage test" in waiting, waiting
    assert str(locks) in waiting
    a.stop()
    assert c.claimed() == gpu_a
    b.stop()
    c.stop()


def _holder_of(locks: Path, gpu: str) -> int:
    return int((locks / f"gpu-{gpu}.lock").read_text().split()[1])


def test_sigkill_releases_the_gpu(holders, locks, monkeypatch):
    monkeypatch.setenv("CXRLT_GPU_IDS", "0")
    a = holders("a")
    assert a.claimed() == "0"
    with pytest.raises(DataError) as exc, claim_gpus(1, "predict", "predict.device", timeout_s=0):
        pass
    msg = str(exc.value)
    assert f"GPU 0 held by pid {a.proc.pid}" in msg and f"lock dir {locks}" in msg, msg
    a.proc.kill()  # SIGKILL: no Python clean-up runs; the kernel drops the lock
    a.proc.wait()
    with claim_gpus(1, "predict", "predict.device", timeout_s=0) as ids:
        assert ids == ["0"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert _holder_of(locks, "0") == os.getpid()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # restored on exit
    assert (locks / "gpu-0.lock").read_text() == ""  # released: the holder line is gone


def test_multi_gpu_claim_and_too_many(locks):
    with claim_gpus(2, "train", "train.devices", timeout_s=0) as ids:
        assert ids == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with claim_gpus(ALL, "train", "train.devices", timeout_s=0) as ids:
        assert ids == ["0", "1"]
    too_many = r"params train.devices asks for 3 GPUs but 2 are available \(ids 0,1"
    with pytest.raises(DataError, match=too_many), claim_gpus(3, "train", "train.devices"):
        pass


def test_partial_claim_is_released_while_waiting(locks):
    """A 2-GPU claim that finds one GPU busy keeps neither (no run holds half of what it needs)."""
    busy = pytest.raises(DataError, match="GPU 1 held by")
    with locks_held(locks, "1"), busy, claim_gpus(2, "train", "train.devices", timeout_s=0):
        pass
    with claim_gpus(1, "fuse", "fuse.device", timeout_s=0) as ids:
        assert ids == ["0"]  # GPU 0 was let go


class locks_held:  # noqa: N801 - used as a context manager
    """Lock files held by this process through their own open files (the claim's own code is
    not used, so the test does not rely on it)."""

    def __init__(self, directory: Path, *gpus: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.files = [open(directory / f"gpu-{g}.lock", "a") for g in gpus]  # noqa: SIM115

    def __enter__(self) -> None:
        for f in self.files:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def __exit__(self, *exc: object) -> None:
        for f in self.files:
            f.close()


def test_visible_devices_narrow_the_candidates(locks, monkeypatch):
    monkeypatch.delenv("CXRLT_GPU_IDS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with claim_gpus(1, "predict", "predict.device", timeout_s=0) as ids:
        assert ids == ["3"] and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


@pytest.mark.parametrize("env", [
    {"CXRLT_GPU_CLAIM": "0"},      # turned off
    {"CXRLT_GPU_IDS": ""},         # no GPU
    {"CXRLT_GPU_IDS": "-1"},
    {"LOCAL_RANK": "1"},           # a launcher (torchrun, Lightning's DDP worker) placed the process
    {"SLURM_STEP_NUM_TASKS": "4"},
])  # fmt: skip
def test_no_claim_changes_nothing(locks, monkeypatch, env):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with claim_gpus(1, "train", "train.devices", timeout_s=0) as ids:
        assert ids == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not locks.exists()


def test_no_gpu_on_this_machine_is_a_no_op(locks, monkeypatch):
    """Without fake ids the real count decides; on a machine without GPUs nothing happens."""
    import torch

    monkeypatch.delenv("CXRLT_GPU_IDS")
    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    with claim_gpus(1, "train", "train.devices", timeout_s=0) as ids:
        assert ids == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not locks.exists()


def test_bad_environment_is_one_clear_error(locks, monkeypatch):
    monkeypatch.setenv("CXRLT_GPU_CLAIM", "maybe")
    with pytest.raises(DataError, match="CXRLT_GPU_CLAIM='maybe'"), claim_gpus(1, "t", "k"):
        pass
    monkeypatch.setenv("CXRLT_GPU_CLAIM", "1")
    monkeypatch.setenv("CXRLT_GPU_WAIT_S", "soon")
    with pytest.raises(DataError, match="CXRLT_GPU_WAIT_S='soon'"), claim_gpus(1, "t", "k"):
        pass


def test_bad_lock_dir_is_one_clear_error(locks, tmp_path, monkeypatch):
    locks.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (locks / "gpu-1.lock").symlink_to(victim)  # a planted link is refused, never written through
    with pytest.raises(DataError, match=r"GPU lock file .*gpu-1.lock: cannot open it"), claim_gpus(2, "t", "k"):
        pass
    assert victim.read_text() == "keep"
    with claim_gpus(1, "t", "k", timeout_s=0) as ids:  # GPU 0, taken before the error, was let go
        assert ids == ["0"]
    monkeypatch.setenv("CXRLT_GPU_LOCK_DIR", str(victim / "locks"))  # a file where a folder should be
    with pytest.raises(DataError, match=r"GPU lock dir .*victim.txt/locks: cannot create it"), claim_gpus(1, "t", "k"):
        pass


@pytest.mark.parametrize("stage,params,count", [
    ("train", {"train": {"accelerator": "auto", "devices": "auto"}}, 1),  # auto: one GPU
    ("train", {"train": {}}, 1),
    ("train", {"train": {"accelerator": "gpu", "devices": 2}}, 2),
    ("train", {"train": {"accelerator": "cuda", "devices": "4"}}, 4),
    ("train", {"train": {"devices": -1}}, ALL),
    ("train", {"train": {"devices": "-1"}}, ALL),
    ("train", {"train": {"devices": [0, 2]}}, 0),   # explicit indices: the user's choice
    ("train", {"train": {"devices": "0,2"}}, 0),
    ("train", {"train": {"accelerator": "cpu", "devices": 2}}, 0),
    ("train", {"train": {"accelerator": "mps"}}, 0),
    ("fuse", {"fuse": {"device": "auto"}}, 1),
    ("fuse", {"fuse": {"device": "cuda"}}, 1),
    ("fuse", {"fuse": {"device": "cuda:1"}}, 0),
    ("predict", {"predict": {"device": "cpu"}}, 0),
    ("predict", {"predict": {"device": "mps"}}, 0),
    ("predict", {}, 1),
    ("zeroshot", {"zeroshot": {"head": {"device": "auto"}}}, 1),
    ("zeroshot", {"zeroshot": {"head": {"device": "cpu"}}}, 0),
])  # fmt: skip
def test_gpus_per_stage(stage, params, count):
    assert stage_gpus(params, stage)[0] == count


def test_decorated_main_runs_holding_its_gpus(locks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"devices": 2}}))
    monkeypatch.setenv("CXRLT_GPU_IDS", "0,1,2")
    seen = []

    @claims_gpus("train")
    def main() -> None:
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])

    with locks_held(locks, "0"):
        main()
    assert seen == ["1,2"] and "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.parametrize("name", ["train", "fuse", "predict", "zeroshot"])
def test_accelerator_stages_are_decorated(name):
    """Each stage that uses the accelerator wraps the function that uses it in
    `claims_gpus("<stage>")`: `main`, or for train `train`, which runs after the decision to
    relaunch under srun (an srun task's GPUs are the scheduler's, so it claims none)."""
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    target = "train" if name == "train" else "main"
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == target)
    assert [ast.unparse(d) for d in fn.decorator_list] == [f"claims_gpus('{name}')"]


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # imports the stage scripts (Lightning): ~25 s alone on a busy 2-core CPU
@pytest.mark.parametrize("name,params,message", [
    ("train", {"train": {"devices": 2}}, "train: 2 free GPU(s) wanted (params train.devices)"),
    ("fuse", {"fuse": {"device": "auto"}}, "fuse: 1 free GPU(s) wanted (params fuse.device)"),
    ("predict", {"predict": {"device": "cuda"}}, "predict: 1 free GPU(s) wanted (params predict.device)"),
])  # fmt: skip
def test_stage_scripts_claim_before_they_start(locks, tmp_path, monkeypatch, capsys, name, params, message):
    """The real stage scripts claim first: with every GPU busy they stop with one line,
    before reading anything else from params or data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("CXRLT_GPU_WAIT_S", "0")
    with locks_held(locks, "0", "1"), pytest.raises(SystemExit) as exc:
        run_stage(_stage(name).main)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert message in err and "GPU 0 held by" in err and f"lock dir {locks}" in err, err
