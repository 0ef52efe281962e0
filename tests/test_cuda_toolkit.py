"""The build's CUDA toolkit resolver (build_tools/cuda_toolkit.py) over fake toolkit trees, and the
build's behaviour around torch (installed torch found under build isolation, a clear line without)."""

import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
import cuda_toolkit as ct  # noqa: E402

NO_DEFAULTS = ()


def _script(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_toolkit(root, version="13.0", runtime="lib64", nvcc_runs=True):
    """A toolkit tree: bin/nvcc answering --version and --dryrun like the real driver, and the
    runtime library in `runtime` (None: missing)."""
    if nvcc_runs:
        _script(os.path.join(root, "bin", "nvcc"),
                'for a in "$@"; do\n'
                f'  [ "$a" = --version ] && echo "Cuda compilation tools, release {version}, V{version}.1" && exit 0\n'
                f'  [ "$a" = --dryrun ] && echo "#\\$ _HERE_={root}/bin" && echo "#\\$ TOP={root}/bin/.." && exit 0\n'
                "done\nexit 1\n")
    else:
        _script(os.path.join(root, "bin", "nvcc"), "exit 3\n")
    if runtime:
        os.makedirs(os.path.join(root, runtime), exist_ok=True)
        open(os.path.join(root, runtime, "libcudart.so"), "w").close()
    return str(root)


def wrapper(dir_, target):
    """An nvcc on PATH that execs the real one (environment modules, conda, spack)."""
    _script(os.path.join(dir_, "nvcc"), f'exec {target} "$@"\n')
    return str(dir_)


def test_cuda_home_wins(tmp_path):
    a = fake_toolkit(tmp_path / "a", "12.8")
    b = fake_toolkit(tmp_path / "b", "13.0")
    s = ct.find_cuda_toolkit({"CUDA_HOME": a}, path=os.path.join(b, "bin"), default_roots=NO_DEFAULTS)
    assert (s.toolkit.root, s.toolkit.version, s.toolkit.found_by) == (a, "12.8", "CUDA_HOME")


def test_cuda_path_is_used_when_cuda_home_is_unset(tmp_path):
    a = fake_toolkit(tmp_path / "a")
    s = ct.find_cuda_toolkit({"CUDA_PATH": a}, path="", default_roots=NO_DEFAULTS)
    assert s.toolkit.root == a and s.toolkit.found_by == "CUDA_PATH"


def test_wrapper_script_on_path_is_asked_for_its_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    path = wrapper(tmp_path / "wrap" / "bin", os.path.join(real, "bin", "nvcc"))
    s = ct.find_cuda_toolkit({}, path=path, default_roots=NO_DEFAULTS)
    # the parent of the wrapper's folder (what torch guesses) has no toolkit; nvcc --dryrun tells the truth
    assert s.toolkit is not None and os.path.realpath(s.toolkit.root) == os.path.realpath(real)
    assert s.toolkit.found_by.startswith("nvcc on PATH")


def test_symlinked_nvcc_is_followed(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-12.6", "12.6")
    os.makedirs(tmp_path / "links")
    os.symlink(os.path.join(real, "bin", "nvcc"), tmp_path / "links" / "nvcc")
    s = ct.find_cuda_toolkit({}, path=str(tmp_path / "links"), default_roots=NO_DEFAULTS)
    assert s.toolkit.root == real and s.toolkit.version == "12.6"


def test_runtime_under_targets_counts(tmp_path):
    root = fake_toolkit(tmp_path / "t", runtime=os.path.join("targets", "x86_64-linux", "lib"))
    s = ct.find_cuda_toolkit({"CUDA_HOME": root}, path="", default_roots=NO_DEFAULTS)
    assert s.toolkit.root == root


def test_missing_runtime_library_is_rejected_with_the_reason(tmp_path):
    bad = fake_toolkit(tmp_path / "bad", runtime=None)
    good = fake_toolkit(tmp_path / "good")
    s = ct.find_cuda_toolkit({"CUDA_HOME": bad}, path="", default_roots=(good,))
    assert s.toolkit.root == good and s.toolkit.found_by == "default location"
    assert any(r.startswith(f"CUDA_HOME: {bad}: no CUDA runtime library") for r in s.rejected)


def test_cuda_home_pointing_to_a_bad_directory(tmp_path):
    good = fake_toolkit(tmp_path / "good")
    s = ct.find_cuda_toolkit({"CUDA_HOME": str(tmp_path / "nope")}, path=os.path.join(good, "bin"),
                             default_roots=NO_DEFAULTS)
    assert s.toolkit.root == good
    assert s.rejected == [f"CUDA_HOME: {tmp_path / 'nope'}: not a directory"]


def test_nvcc_that_does_not_run_is_rejected(tmp_path):
    broken = fake_toolkit(tmp_path / "broken", nvcc_runs=False)
    s = ct.find_cuda_toolkit({"CUDA_HOME": broken}, path="", default_roots=NO_DEFAULTS)
    assert s.toolkit is None
    assert "does not run" in s.describe() and broken in s.describe()


def test_nothing_found(tmp_path):
    s = ct.find_cuda_toolkit({}, path=str(tmp_path), default_roots=(str(tmp_path / "usr-local-cuda"),))
    assert s.toolkit is None
    assert "no usable CUDA toolkit" in s.describe() and "usr-local-cuda: not a directory" in s.describe()
    assert "no CUDA toolkit found" in ct.find_cuda_toolkit({}, path=str(tmp_path), default_roots=()).describe()


def test_plan(tmp_path):
    good = fake_toolkit(tmp_path / "good", "13.0")
    old = fake_toolkit(tmp_path / "old", "12.4")
    none = ct.Search(None)
    assert ct.plan_cuda_build("13.0", {}, ct.find_cuda_toolkit({"CUDA_HOME": good}, path="", default_roots=())).toolkit.root == good
    assert ct.plan_cuda_build(None, {}, none).note == "the installed torch is a CPU build"
    assert ct.plan_cuda_build("13.0", {"DCTKD_NO_CUDA": "1"}, none).note == "DCTKD_NO_CUDA=1"
    assert "no CUDA toolkit found" in ct.plan_cuda_build("13.0", {}, none).note
    mismatch = ct.plan_cuda_build("13.0", {}, ct.find_cuda_toolkit({"CUDA_HOME": old}, path="", default_roots=()))
    assert mismatch.toolkit is None and "does not match torch's CUDA 13.0" in mismatch.note
    for torch_cuda, search in ((None, none), ("13.0", none)):
        with pytest.raises(SystemExit, match="FORCE_CUDA=1, but .*CUDA_HOME"):
            ct.plan_cuda_build(torch_cuda, {"FORCE_CUDA": "1"}, search)


def test_this_machine_resolves_the_toolkit_behind_its_nvcc():
    s = ct.find_cuda_toolkit()
    if s.toolkit is None:
        pytest.skip(f"this machine has no CUDA toolkit ({s.describe()})")
    assert ct.runtime_library(s.toolkit.root) is not None
    assert ct.nvcc_version(os.path.join(s.toolkit.root, "bin", "nvcc")) == s.toolkit.version


def test_build_info_names_the_toolkit_or_why_none():
    import torch

    import dctkd_ext

    info = dctkd_ext.BUILD_INFO
    if info["with_cuda"]:
        assert set(info["cuda_toolkit"]) == {"path", "version", "found_by"}
        assert info["cuda_toolkit"]["version"].split(".")[0] == torch.version.cuda.split(".")[0]
    else:
        assert info["cuda_toolkit"] is None and info["cuda_note"]


def test_torch_is_not_a_build_requirement():
    # a build requirement on torch would make pip download a second torch into the build environment
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        requires = re.search(r"^requires\s*=\s*\[(.*?)\]", f.read(), re.M | re.S).group(1)
    assert "setuptools" in requires and "torch" not in requires.lower()


def test_build_without_torch_says_what_to_install(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True, timeout=120)
    py = tmp_path / "v" / "bin" / "python"
    out = subprocess.run([str(py), "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "builds against an installed PyTorch and found none" in out.stderr
    assert "pip install" in out.stderr and "Traceback" not in out.stderr


def test_build_without_a_toolkit_says_so_in_one_line(tmp_path):
    # setup.py as pip runs it, on a machine with no toolkit anywhere: CPU ops, one line, no error
    code = (
        "import os, runpy, sys; sys.path.insert(0, 'build_tools'); import cuda_toolkit; "
        "cuda_toolkit.DEFAULT_ROOTS = (); sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA", "DCTKD_NO_CUDA")}
    env["PATH"] = str(tmp_path)  # no nvcc
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "CUDA kernels skipped" in line]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "no CUDA toolkit found" in lines[0] and "CUDA_HOME=/path/to/cuda pip install -e ." in lines[0]
    assert out.stdout.strip().endswith("0.1.0")
    # FORCE_CUDA=1 on the same machine stops with what was looked for
    env["FORCE_CUDA"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FORCE_CUDA=1, but no CUDA toolkit found" in out.stderr
