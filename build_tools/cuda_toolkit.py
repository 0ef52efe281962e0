"""Find the CUDA toolkit to build the CUDA kernels with, the way users expect (standard library only).

Candidates, in order; the first usable one wins:

1. ``CUDA_HOME``, then ``CUDA_PATH``, when set;
2. the toolkit behind the ``nvcc`` on ``PATH``: symlinks are followed, and a wrapper script (environment
   modules, conda, spack) is asked for its real location through ``nvcc --dryrun`` (its ``TOP=`` line);
3. the conventional default location, ``/usr/local/cuda``.

A candidate counts only when ``<root>/bin/nvcc --version`` runs and the CUDA runtime library is there
(``lib64/`` or ``targets/*/lib/``). Every rejected candidate is kept with the reason, for the
build's message and ``dctkd_ext.BUILD_INFO``.

    python build_tools/cuda_toolkit.py      # prints what the build would use and why
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

DEFAULT_ROOTS = ("/usr/local/cuda",)
_TIMEOUT_S = 30


@dataclass
class Toolkit:
    root: str
    version: str  # "13.0"
    found_by: str  # "CUDA_HOME", "CUDA_PATH", "nvcc on PATH (...)", "default location"


@dataclass
class Search:
    toolkit: Toolkit | None
    rejected: list[str] = field(default_factory=list)  # "<where>: <path>: <why>"

    def describe(self) -> str:
        if self.toolkit is not None:
            t = self.toolkit
            return f"CUDA {t.version} at {t.root} (from {t.found_by})"
        if not self.rejected:
            return "no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH)"
        return "no usable CUDA toolkit: " + "; ".join(self.rejected)


def nvcc_version(nvcc: str) -> str | None:
    """'13.0' when `nvcc --version` runs, else None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else None


def runtime_library(root: str) -> str | None:
    """The CUDA runtime shared library a link with -lcudart needs, or None."""
    for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*"):
        hits = sorted(glob.glob(os.path.join(root, pattern)))
        if hits:
            return hits[0]
    return None


def check_root(root: str) -> tuple[str | None, str]:
    """(version, "") when root is a usable toolkit, else (None, why not)."""
    if not os.path.isdir(root):
        return None, "not a directory"
    nvcc = os.path.join(root, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return None, "no bin/nvcc"
    version = nvcc_version(nvcc)
    if version is None:
        return None, "bin/nvcc does not run (`nvcc --version` failed)"
    if runtime_library(root) is None:
        return None, "no CUDA runtime library (libcudart.so in lib64/ or targets/*/lib/)"
    return version, ""


def root_behind_nvcc(nvcc: str) -> str | None:
    """The toolkit root of an nvcc found on PATH: the real file's ../ when it sits in a toolkit's
    bin/ (symlinks followed), else what nvcc itself reports in `--dryrun` (wrapper scripts)."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if os.path.basename(os.path.dirname(real)) == "bin" and runtime_library(root) is not None:
        return root
    try:
        # --dryrun prints the driver's variables without compiling; the input file need not exist.
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", os.path.join(os.sep, "nonexistent", "probe.cu")],
            capture_output=True, text=True, timeout=_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return root
    text = out.stdout + out.stderr
    top = re.search(r"^#\$ TOP=(.+)$", text, re.M)
    if top:
        return os.path.normpath(top.group(1).strip())
    here = re.search(r"^#\$ _HERE_=(.+)$", text, re.M)
    return os.path.dirname(os.path.normpath(here.group(1).strip())) if here else root


def find_cuda_toolkit(environ=None, path: str | None = None, default_roots=None) -> Search:
    """Resolve the toolkit from the environment `environ` (default os.environ), `path` (default its
    PATH) and the conventional locations `default_roots` (default DEFAULT_ROOTS)."""
    environ = os.environ if environ is None else environ
    default_roots = DEFAULT_ROOTS if default_roots is None else default_roots
    path = environ.get("PATH", os.defpath) if path is None else path
    search = Search(None)
    candidates: list[tuple[str, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            candidates.append((var, environ[var]))
    nvcc = shutil.which("nvcc", path=path)
    if nvcc:
        root = root_behind_nvcc(nvcc)
        if root:
            candidates.append((f"nvcc on PATH ({nvcc})", root))
    candidates += [("default location", r) for r in default_roots]

    seen = set()
    for where, root in candidates:
        key = os.path.realpath(root)
        if key in seen:
            continue
        seen.add(key)
        version, why = check_root(root)
        if version is not None:
            search.toolkit = Toolkit(os.path.abspath(root), version, where)
            return search
        search.rejected.append(f"{where}: {root}: {why}")
    return search


@dataclass
class CudaPlan:
    toolkit: Toolkit | None  # None: build the CPU ops only
    note: str  # what was used, or why the CUDA kernels are skipped


SKIP_HINT = "to build them: CUDA_HOME=/path/to/cuda pip install -e ."


def plan_cuda_build(torch_cuda: str | None, environ=None, search: Search | None = None) -> CudaPlan:
    """Whether to compile the CUDA kernels. `torch_cuda` is torch.version.cuda (None for a CPU
    build of torch). FORCE_CUDA=1 turns every reason to skip into an error (SystemExit);
    DCTKD_NO_CUDA=1 skips them."""
    environ = os.environ if environ is None else environ
    force = environ.get("FORCE_CUDA", "0") == "1"

    def skip(reason: str) -> CudaPlan:
        if force:
            raise SystemExit(f"dctkd_ext: FORCE_CUDA=1, but {reason}. Point CUDA_HOME at a CUDA toolkit "
                             "(a directory with bin/nvcc and lib64/libcudart.so) that matches torch's CUDA.")
        return CudaPlan(None, reason)

    if environ.get("DCTKD_NO_CUDA", "0") == "1" and not force:
        return CudaPlan(None, "DCTKD_NO_CUDA=1")
    if torch_cuda is None:
        return skip("the installed torch is a CPU build")
    search = find_cuda_toolkit(environ) if search is None else search
    if search.toolkit is None:
        return skip(search.describe())
    t = search.toolkit
    if t.version.split(".")[0] != torch_cuda.split(".")[0]:
        return skip(f"CUDA {t.version} at {t.root} (from {t.found_by}) does not match torch's CUDA "
                    f"{torch_cuda} (the major versions must agree)")
    return CudaPlan(t, search.describe())


if __name__ == "__main__":
    import sys

    if "--root" in sys.argv:  # for CMake: the root alone, or nothing
        t = find_cuda_toolkit().toolkit
        print(t.root if t else "")
    else:
        print(find_cuda_toolkit().describe())
