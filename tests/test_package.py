"""gdiff as an installed package: the wheel, the `gdiff` command, shipped configs by name, and the
one-line errors for a missing config or an unknown key, run from outside the checkout."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from gdiff import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the gdiff wheel installed; its dependencies come from this test
    environment's site-packages (offline: nothing is downloaded)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("gdiff", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(dist)],
        check=True, cwd=root,
    )  # fmt: skip
    wheel = next(dist.glob("gdiff-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", str(wheel)]
    subprocess.run(pip, check=True)
    return {"venv": venv, "wheel": wheel, "cwd": root}


def _gdiff(installed, *args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [str(installed["venv"] / "bin" / "gdiff"), *args],
        cwd=installed["cwd"], env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_wheel_holds_the_library_and_the_configs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "gdiff/cli.py" in names and "configs/released/imagenet64.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(installed["wheel"]).read(entry[0]).decode()
    assert "gdiff = gdiff.cli:main" in text


def test_installed_command_runs_a_tiny_job_outside_the_checkout(installed, tmp_path):
    help_text = _gdiff(installed, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--mode" in help_text.stdout and "released/imagenet64" in help_text.stdout
    workdir = tmp_path / "run"
    out = _gdiff(
        installed, "--config", "tiny", "--mode=train", f"--workdir={workdir}",
        "--config.train.num_steps=2", "--config.train.save_every=2",
        "--config.train.progress=False",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (workdir / "checkpoints" / "2").is_dir()
    # The library that ran is the installed one, not this checkout.
    where = subprocess.run(
        [str(installed["venv"] / "bin" / "python"), "-c", "import gdiff; print(gdiff.__file__)"],
        cwd=installed["cwd"], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert str(installed["venv"]) in where.stdout and str(REPO) not in where.stdout


def test_bad_config_arguments_end_in_one_line(installed):
    missing = _gdiff(installed, "--config", "released/imagenet6")
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "did you mean 'released/imagenet64'" in missing.stderr
    unknown = _gdiff(installed, "--config", "tiny", "--config.model.dtyp=bfloat16")
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "unknown config key 'model.dtyp': group 'model' has no 'dtyp'" in unknown.stderr
    assert "did you mean 'model.dtype'" in unknown.stderr


def test_config_names_resolve_to_shipped_files():
    assert cli.resolve_config("released/imagenet64").endswith("configs/released/imagenet64.py")
    assert cli.resolve_config("configs/tiny.py") == "configs/tiny.py"  # an existing path wins
    assert "ablations/classifier_scale" in cli.shipped_configs()
    with pytest.raises(cli.UsageError, match="did you mean 'tiny'"):
        cli.resolve_config("tiy")
