"""GPU claims: each stage that uses the accelerator takes free GPUs, so queued runs spread out.

DVC does not assign GPUs: `dvc queue start -j N` on an N-GPU machine would start N runs on
the same GPU. The train, fuse, predict and zeroshot stages therefore claim the GPUs they need before
torch initialises CUDA, and set `CUDA_VISIBLE_DEVICES` to them for the stage and its
children (Lightning's DDP workers). A claim is an exclusive `flock` on one file per GPU in
a lock directory; the kernel drops it when the process exits however it exits (crash,
SIGKILL), so a dead run never keeps a GPU. The files also hold a line naming the holder
(pid, host, stage, start, folder) for people (`cat`); only the lock decides.

Environment (machine settings, not experiment params: they never change what a run computes):
  CXRLT_GPU_CLAIM=0      no claims (the stages use whatever torch sees, as without this module)
  CXRLT_GPU_IDS=0,1,2    the GPUs to share out (default: CUDA_VISIBLE_DEVICES if set, else all)
  CXRLT_GPU_LOCK_DIR     the lock directory (default: <temp dir>/cxrlt-gpu-locks-<uid>)
  CXRLT_GPU_WAIT_S       how long a stage waits for busy GPUs before failing (default 86400)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cxrlt.errors import DataError
from cxrlt.params import load_params

ENV_CLAIM = "CXRLT_GPU_CLAIM"
ENV_IDS = "CXRLT_GPU_IDS"
ENV_LOCK_DIR = "CXRLT_GPU_LOCK_DIR"
ENV_WAIT = "CXRLT_GPU_WAIT_S"
# Set while a claim is held; a child that inherits it (a DDP worker re-running the stage
# script) uses its parent's GPUs instead of claiming again.
ENV_HELD = "CXRLT_GPUS_HELD"
DEFAULT_WAIT_S = 86400.0
ALL = -1  # a claim of every candidate GPU (Lightning's `devices: -1`)

log = logging.getLogger(__name__)


def default_lock_dir() -> Path:
    # Per user: a directory shared between users needs care with permissions (see README).
    return Path(tempfile.gettempdir()) / f"cxrlt-gpu-locks-{os.getuid()}"


def lock_dir() -> Path:
    return Path(os.environ.get(ENV_LOCK_DIR) or default_lock_dir())


def enabled() -> bool:
    value = os.environ.get(ENV_CLAIM, "1").strip().lower()
    if value in ("1", "on", "true", "yes", ""):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise DataError(f"environment variable {ENV_CLAIM}={value!r}: use 1 (claim GPUs) or 0 (do not)")


def _id_list(text: str) -> list[str]:
    """Ids as CUDA reads CUDA_VISIBLE_DEVICES: up to the first negative entry ("-1": none)."""
    ids: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.startswith("-"):
            break
        if part and part not in ids:
            ids.append(part)
    return ids


def _gpu_count() -> int:
    """Number of CUDA GPUs, counted without initialising CUDA in this process.

    CUDA reads CUDA_VISIBLE_DEVICES once, when the driver starts; a count through the CUDA
    runtime would fix it to every GPU before the claim sets it. torch counts through NVML
    first, which does not start the driver; without NVML the count runs in a child process.
    """
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    nvml = getattr(torch.cuda, "_device_count_nvml", None)
    n = nvml() if nvml is not None else -1
    if n >= 0:
        return n
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")):
        return 0  # no NVIDIA driver on this machine
    import subprocess

    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return int(res.stdout.strip()) if res.returncode == 0 and res.stdout.strip().isdigit() else 0


def candidate_gpus() -> list[str]:
    """The GPU ids to share out: CXRLT_GPU_IDS, else CUDA_VISIBLE_DEVICES, else 0..count-1."""
    for var in (ENV_IDS, "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            return _id_list(os.environ[var])
    return [str(i) for i in range(_gpu_count())]


def _placed_by_launcher() -> bool:
    """True when a distributed launcher started this process and chose its GPUs: torchrun and
    Lightning's own DDP workers (LOCAL_RANK / RANK), or srun starting several tasks."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return True
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    return tasks.isdigit() and int(tasks) > 1


def _lock_file(directory: Path, gpu: str) -> Path:
    # Ids may be UUIDs (GPU-…, MIG-…); keep the file name to safe characters.
    return directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another process holds it.

    The file is never replaced or deleted: a lock lives on the file's inode, and a new inode
    at the same path would let a second process "hold" the same GPU.
    """
    import fcntl

    flags = os.O_NOFOLLOW | os.O_CLOEXEC  # O_NOFOLLOW: a planted symlink is refused, not written
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
        except PermissionError:  # a shared lock dir with another user's file: a read fd locks too
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as e:
        raise DataError(f"GPU lock file {path}: cannot open it ({e.strerror}; set {ENV_LOCK_DIR} "
                        "to a directory of your own)") from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_holder(fd: int, stage: str) -> None:
    """The holder's line for people reading the lock file; best effort."""
    text = (f"pid {os.getpid()} on {socket.gethostname()}, stage {stage}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, in {os.getcwd()}\n")  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only fd (another user's file) cannot record
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "holder not recorded yet"
    except OSError:
        return "holder unknown"


def _busy_text(directory: Path, busy: list[str]) -> str:
    return "; ".join(f"GPU {g} held by {_holder(_lock_file(directory, g))}" for g in busy)


def _wait_limit() -> float:
    text = os.environ.get(ENV_WAIT)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise DataError(f"environment variable {ENV_WAIT}={text!r}: use seconds >= 0")
    return value


@contextlib.contextmanager
def claim_gpus(count: int, stage: str, key: str, *, timeout_s: float | None = None,
               poll_s: float = 2.0) -> Iterator[list[str]]:  # fmt: skip
    """Hold `count` free GPUs (ALL: every candidate) for the block; yield their ids.

    Yields [] and changes nothing when `count` is 0, claims are off, there is no GPU, a
    launcher placed this process, or the system has no flock (not POSIX); yields the
    parent's ids in a child of a claiming process.
    When too few GPUs are free it releases what it took (two runs each holding half of what
    they need would wait for ever), waits `poll_s` and tries again, up to `timeout_s`
    (default CXRLT_GPU_WAIT_S). `key` is the params entry that asked, for the messages.
    """
    if ENV_HELD in os.environ:
        yield _id_list(os.environ[ENV_HELD])
        return
    if count == 0 or not enabled() or _placed_by_launcher() or os.name != "posix":
        yield []
        return
    gpus = candidate_gpus()
    if not gpus:
        yield []
        return
    want = len(gpus) if count == ALL else count
    if want > len(gpus):
        raise DataError(f"params {key} asks for {want} GPUs but {len(gpus)} are available "
                        f"(ids {','.join(gpus)}; set {ENV_IDS} or CUDA_VISIBLE_DEVICES to change them)")  # fmt: skip
    directory = lock_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"GPU lock dir {directory}: cannot create it ({e}; set {ENV_LOCK_DIR})") from None  # fmt: skip
    limit = _wait_limit() if timeout_s is None else timeout_s
    start = time.monotonic()
    next_note = start
    while True:
        held: dict[str, int] = {}
        busy: list[str] = []
        try:
            for gpu in gpus:
                if len(held) == want:
                    break
                fd = _try_lock(_lock_file(directory, gpu))
                if fd is None:
                    busy.append(gpu)
                else:
                    held[gpu] = fd
        except DataError:
            for fd in held.values():
                os.close(fd)
            raise
        if len(held) == want:
            break
        for fd in held.values():
            os.close(fd)
        waited = time.monotonic() - start
        if waited >= limit:
            raise DataError(f"{stage}: {want} free GPU(s) wanted (params {key}), {len(gpus) - len(busy)} "
                            f"free after {waited:.0f} s: {_busy_text(directory, busy)}; lock dir {directory} "
                            f"(wait longer with {ENV_WAIT}, or {ENV_CLAIM}=0 to not claim)")  # fmt: skip
        if time.monotonic() >= next_note:  # say why the stage is idle, then every 10 minutes
            log.warning("%s: waiting for %d free GPU(s) of %s: %s; lock dir %s", stage, want,
                        ",".join(gpus), _busy_text(directory, busy), directory)  # fmt: skip
            next_note = time.monotonic() + 600
        time.sleep(min(poll_s, max(limit - waited, 0.0)))
    ids = list(held)
    before = {var: os.environ.get(var) for var in ("CUDA_VISIBLE_DEVICES", ENV_HELD)}
    try:
        for fd in held.values():
            _write_holder(fd, stage)
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[ENV_HELD] = ",".join(ids)
        log.info("%s: claimed GPU %s (CUDA_VISIBLE_DEVICES=%s; lock dir %s)", stage,
                 ",".join(ids), ",".join(ids), directory)  # fmt: skip
        yield ids
    finally:
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the holder line goes; the file stays (see _try_lock)
            os.close(fd)


def lightning_gpus(accelerator: Any, devices: Any) -> int:
    """GPUs a Lightning Trainer with these settings uses, as a claim.

    `devices: auto` is one GPU: Lightning would take every GPU it sees, so a queue of runs
    would wait on each other and a run's batch size would depend on the machine; ask for
    more with a number (or -1: all). Explicit indices ([0, 1], "0,1") are the user's choice
    and claim nothing.
    """
    if str(accelerator).lower() not in ("auto", "gpu", "cuda"):
        return 0
    if isinstance(devices, bool):
        return 0
    if isinstance(devices, str):
        text = devices.strip()
        if text.lower() == "auto":
            return 1
        if "," in text or not text.lstrip("-").isdigit():
            return 0
        devices = int(text)
    if isinstance(devices, int):
        return ALL if devices == -1 else max(devices, 0)
    return 0  # a list of indices


def device_gpus(spec: Any) -> int:
    """GPUs a torch device spec (`predict.device`, `fuse.device`) uses: 1 for auto / cuda;
    none for cpu, mps or an explicit index (cuda:1, the user's choice)."""
    return 1 if str(spec).strip().lower() in ("auto", "cuda", "gpu") else 0


def stage_gpus(params: Mapping[str, Any], stage: str) -> tuple[int, str]:
    """(GPUs the stage claims, the params key that decides it)."""

    def get(name: str, key: str, default: Any) -> Any:
        node = params.get(name)
        return node.get(key, default) if isinstance(node, Mapping) else default

    if stage == "train":
        accelerator, devices = get("train", "accelerator", "auto"), get("train", "devices", "auto")
        return lightning_gpus(accelerator, devices), "train.devices"
    if stage in ("fuse", "predict"):
        return device_gpus(get(stage, "device", "auto")), f"{stage}.device"
    if stage == "zeroshot":
        head = get("zeroshot", "head", {})
        return device_gpus(head.get("device", "auto") if isinstance(head, Mapping) else "auto"), "zeroshot.head.device"
    raise ValueError(f"no GPU rule for stage {stage!r}")


def claims_gpus(stage: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorate a stage's `main` so it runs holding the GPUs its params ask for."""

    def wrap(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def run() -> None:
            count, key = stage_gpus(load_params(), stage)
            with claim_gpus(count, stage, key):
                main()

        return run

    return wrap
