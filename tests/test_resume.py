"""Resumable training: a killed run continues from its last epoch and ends exactly as an
uninterrupted one; a state of another run, or a broken one, is never resumed."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import CLASSES, _params, prepared  # noqa: F401 - `prepared` is a fixture

from cxrlt.training import resume
from cxrlt.training.fit import fit
from cxrlt.training.resume import CKPT, FINGERPRINT, AtomicCheckpointIO, TrainState, fingerprint

KILL_SCRIPT = """
import json, os, signal, sys
import pandas as pd
from cxrlt.labels import TASK1_CLASSES
from cxrlt.training.fit import fit
from cxrlt.training.module import ImageClassifierModule

real = ImageClassifierModule.on_train_batch_end
def kill_in_epoch_1(self, outputs, batch, batch_idx):  # the real hook, then a real kill
    real(self, outputs, batch, batch_idx)
    if self.current_epoch == 1 and batch_idx == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ImageClassifierModule.on_train_batch_end = kill_in_epoch_1

if __name__ == "__main__":
    df = pd.read_parquet(sys.argv[1])
    fit(df, list(TASK1_CLASSES), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], live_dir=sys.argv[5])
"""


def _resumable(state_dir: Path, **train) -> dict:
    """Every stateful part on: augmentation generator, EMA, DRW, repeat-factor sampler, cRT."""
    params = _params("wbce")
    params["sampler"] = "repeat_factor"
    params["train"].update({"epochs": 2, "threads": 1, "limit_train_batches": 3, "log_every_n_steps": 1,
                            "drw_epoch": 1, "ema_decay": 0.9, "state_dir": str(state_dir),
                            "crt": {"epochs": 2, "sampler": "random", "lr": 0.01, "batch_size": 8}})  # fmt: skip
    params["train"].update(train)
    return params


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    assert (sa["best_epoch"], sa["val_mAP"], sa["crt"]) == (sb["best_epoch"], sb["val_mAP"], sb["crt"])


def _live(live_dir: Path) -> dict[str, str]:
    return {p.relative_to(live_dir).as_posix(): p.read_text() for p in sorted(live_dir.rglob("*")) if p.is_file()}


def _resume_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == resume.__name__]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The uninterrupted run (state on, so it also shows a fresh run is unchanged by it)."""
    df, cache_dir = prepared
    out = tmp_path_factory.mktemp("reference")
    fit(df, CLASSES, cache_dir, _resumable(out / "state"), out / "ref.pt", live_dir=out / "live")
    assert not any((out / "state").iterdir())  # a finished run leaves no state behind
    # The last epoch is the kept one, so the final weights depend on what a resumed run trains.
    assert torch.load(out / "ref.pt", weights_only=True)["best_epoch"] == 1
    return out


@pytest.mark.slow
def test_killed_run_resumes_at_its_last_epoch_and_ends_identical(
    prepared, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
):
    df, cache_dir = prepared
    df.to_parquet(tmp_path / "m.parquet")
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    params = _resumable(tmp_path / "state")
    res = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "m.parquet"), str(cache_dir),
                          json.dumps(params), str(tmp_path / "out.pt"), str(tmp_path / "live")],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (tmp_path / "out.pt").exists() and (tmp_path / "state" / CKPT).exists()
    shutil.copytree(tmp_path / "state", tmp_path / "killed_state")  # for the stale-state run below

    with caplog.at_level(logging.INFO, logger=resume.__name__):
        info = fit(df, CLASSES, cache_dir, params, tmp_path / "out.pt", live_dir=tmp_path / "live")
    assert [m for m in _resume_lines(caplog) if "resuming" in m] == [
        f"train: resuming from {tmp_path / 'state' / CKPT} at epoch 1"
    ]
    _same_weights(reference / "ref.pt", tmp_path / "out.pt")
    assert info["best_epoch"] == torch.load(reference / "ref.pt", weights_only=True)["best_epoch"]
    # The curves continue: every dvclive file equals the uninterrupted run's, row for row.
    assert _live(tmp_path / "live") == _live(reference / "live")
    assert not any((tmp_path / "state").iterdir())

    # The same killed state under other params (here the learning rate) is not resumed.
    caplog.clear()
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "killed_state", tmp_path / "state")
    other = _resumable(tmp_path / "state", epochs=1, crt={"epochs": 0}, optim={"lr": 0.002})
    with caplog.at_level(logging.INFO, logger=resume.__name__):
        fit(df, CLASSES, cache_dir, other, tmp_path / "other.pt")
    assert _resume_lines(caplog) == [
        f"train: not resuming {tmp_path / 'state'} (it was written by a different run; changed: params); "
        "starting fresh"
    ]
    fresh = dict(other, train={k: v for k, v in other["train"].items() if k != "state_dir"})
    fit(df, CLASSES, cache_dir, fresh, tmp_path / "fresh.pt")
    assert (tmp_path / "other.pt").read_bytes() == (tmp_path / "fresh.pt").read_bytes()

    # The real checkpoint cut short (as a non-atomic write killed half-way would leave it).
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "killed_state", tmp_path / "state")
    data = (tmp_path / "state" / CKPT).read_bytes()
    (tmp_path / "state" / CKPT).write_bytes(data[: len(data) - 100])
    state = TrainState(tmp_path / "state", fingerprint(params, CLASSES, df, cache_dir))
    caplog.clear()
    assert state.prepare() is None
    assert "last.ckpt cannot be read" in caplog.records[-1].getMessage()


@pytest.mark.slow
def test_run_killed_during_crt_does_not_train_again(
    prepared, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):  # fmt: skip
    """cRT runs after the fit; the state then holds the finished fit, and a re-run only re-does
    cRT. (A crash stands for the kill: the state on disk is the same, nothing cleans up.)"""
    from cxrlt.training import fit as fit_module

    df, cache_dir = prepared
    params = _resumable(tmp_path / "state")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fit_module, "retrain_classifier", crash)
        with pytest.raises(KeyboardInterrupt):
            fit(df, CLASSES, cache_dir, params, tmp_path / "out.pt", live_dir=tmp_path / "live")
    assert (tmp_path / "state" / CKPT).exists()
    with caplog.at_level(logging.INFO, logger=resume.__name__):
        fit(df, CLASSES, cache_dir, params, tmp_path / "out.pt", live_dir=tmp_path / "live")
    assert f"train: resuming from {tmp_path / 'state' / CKPT} at epoch 2" in _resume_lines(caplog)
    _same_weights(reference / "ref.pt", tmp_path / "out.pt")
    assert _live(tmp_path / "live") == _live(reference / "live")


def _state(tmp_path: Path, prepared, **train) -> TrainState:  # noqa: F811
    df, cache_dir = prepared
    params = _resumable(tmp_path / "state", **train)
    return TrainState(params["train"]["state_dir"], fingerprint(params, CLASSES, df, cache_dir))


def test_fingerprint_names_the_part_that_changed(prepared, tmp_path: Path):  # noqa: F811
    df, cache_dir = prepared
    base = _state(tmp_path, prepared).fp
    # where the state, checkpoint or curves go, or a progress bar, changes no weight
    moved = _resumable(tmp_path / "elsewhere", checkpoint="x.pt", live_dir="l", progress_bar=True)
    assert fingerprint(moved, CLASSES, df, cache_dir) == base
    changed = {
        "params": fingerprint(_resumable(tmp_path, epochs=3), CLASSES, df, cache_dir),
        "manifest": fingerprint(_resumable(tmp_path), CLASSES, df.iloc[1:], cache_dir),
        "classes": fingerprint(_resumable(tmp_path), CLASSES[:-1], df, cache_dir),
    }
    for part, fp in changed.items():
        assert fp["digest"] != base["digest"]
        assert [k for k in base["parts"] if fp["parts"][k] != base["parts"][k]] == [part]


def test_state_of_another_run_or_a_broken_file_is_discarded(prepared, tmp_path: Path, caplog):  # noqa: F811
    ours = _state(tmp_path, prepared)
    theirs = _state(tmp_path, prepared, epochs=5)
    cases = {
        "it was written by a different run; changed: params": (theirs.fp, b"PK\x03\x04"),
        "last.ckpt cannot be read: ": (ours.fp, b"PK\x03\x04 a write cut short"),
        f"{FINGERPRINT} unreadable": (None, b"PK\x03\x04"),
    }
    for reason, (fp, data) in cases.items():
        ours.dir.mkdir(exist_ok=True)
        (ours.dir / CKPT).write_bytes(data)
        (ours.dir / f".{CKPT}.abc.tmp").write_bytes(data[:2])  # a killed write's temp file
        (ours.dir / FINGERPRINT).write_text("{" if fp is None else json.dumps(fp))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=resume.__name__):
            assert ours.prepare() is None and ours.resume_from is None
        assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()
        assert "starting fresh" in caplog.records[0].getMessage()
        assert sorted(p.name for p in ours.dir.iterdir()) == [FINGERPRINT]  # ours, nothing else
        assert json.loads((ours.dir / FINGERPRINT).read_text()) == ours.fp
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=resume.__name__):
        assert ours.prepare() is None  # no checkpoint: a plain fresh start, nothing to report
    assert not caplog.records


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path):
    path = tmp_path / CKPT
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an unpicklable object
        io.save_checkpoint({"epoch": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CKPT]


def test_global_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path):
    import random

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save(resume._rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    resume._set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_dvclive_files_are_put_back_as_at_the_checkpoint(tmp_path: Path):
    """Rows a killed run logged after its checkpoint are dropped; the rest is restored."""
    live = tmp_path / "live"
    (live / "plots" / "metrics" / "val").mkdir(parents=True)
    (live / "plots" / "metrics" / "val" / "mAP.tsv").write_text("step\tmAP\n3\t0.1\n")
    (live / "metrics.json").write_text('{"step": 3}')
    saved = resume._live_files(live)
    (live / "plots" / "metrics" / "val" / "mAP.tsv").write_text("step\tmAP\n3\t0.1\n7\t0.2\n")
    (live / "plots" / "metrics" / "extra.tsv").write_text("step\tx\n7\t1\n")
    state = TrainState(tmp_path / "state", {"digest": "d", "parts": {}})
    state.live = saved
    state.restore_live(live)
    assert resume._live_files(live) == saved
    assert pd.read_csv(live / "plots" / "metrics" / "val" / "mAP.tsv", sep="\t")["step"].tolist() == [3]


DDP_KILL_SCRIPT = """
import json, logging, os, signal, sys
import pandas as pd
from cxrlt.labels import TASK1_CLASSES
from cxrlt.training.fit import fit
from cxrlt.training.module import ImageClassifierModule

if sys.argv[5] == "kill":
    real = ImageClassifierModule.on_train_batch_end
    def kill_all_ranks(self, outputs, batch, batch_idx):
        real(self, outputs, batch, batch_idx)
        if self.current_epoch == 1 and batch_idx == 1 and self.global_rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank at once, as a node failure
    ImageClassifierModule.on_train_batch_end = kill_all_ranks

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    df = pd.read_parquet(sys.argv[1])
    fit(df, list(TASK1_CLASSES), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
"""


@pytest.mark.slow
def test_ddp_run_killed_on_every_rank_resumes_identical(prepared, tmp_path: Path, caplog):  # noqa: F811
    """2 CPU processes (gloo): rank 0 writes the state, both ranks resume from it, and the
    result equals the uninterrupted DDP run's."""
    df, cache_dir = prepared
    df.to_parquet(tmp_path / "m.parquet")
    (tmp_path / "ddp.py").write_text(DDP_KILL_SCRIPT)
    params = _resumable(tmp_path / "state", crt={"epochs": 0}, accelerator="cpu", devices=2, strategy="ddp")

    def run(out: str, mode: str, state: str) -> subprocess.CompletedProcess:
        p = dict(params, train=dict(params["train"], state_dir=str(tmp_path / state)))
        return subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path / "m.parquet"), str(cache_dir),
                               json.dumps(p), str(tmp_path / out), mode],
                              capture_output=True, text=True, timeout=900, start_new_session=True)  # fmt: skip

    ref = run("ref.pt", "plain", "ref_state")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run("out.pt", "kill", "state")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "state" / CKPT).exists() and not (tmp_path / "out.pt").exists()
    resumed = run("out.pt", "plain", "state")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # both ranks said so (rank 1 is a child process of the launcher: its log is on stderr too)
    line = f"train: resuming from {tmp_path / 'state' / CKPT} at epoch 1"
    assert resumed.stderr.count(line) == 2, resumed.stderr[-3000:]
    assert (tmp_path / "out.pt").read_bytes() == (tmp_path / "ref.pt").read_bytes()
    assert not any((tmp_path / "state").iterdir())
