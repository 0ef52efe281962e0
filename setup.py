"""Build of dctkd_ext: the C++ ops always; the CUDA ops when torch is a CUDA build and a matching CUDA
toolkit is found (build_tools/cuda_toolkit.py: CUDA_HOME / CUDA_PATH, the nvcc on PATH, /usr/local/cuda).
FORCE_CUDA=1 makes a missing toolkit an error, DCTKD_NO_CUDA=1 skips the CUDA ops. Builds against the
torch installed in the environment, with or without pip's build isolation:

    pip install -e .
"""

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
from cuda_toolkit import SKIP_HINT, plan_cuda_build  # noqa: E402

VERSION = "0.1.0"


def import_installed_torch():
    """The torch of the environment pip was run from. Under build isolation pip hides that
    environment's packages from the build; the same interpreter, started without pip's overlay,
    says where its torch lives, and that directory is appended to sys.path (after the build's own
    packages), so the extension is compiled against exactly the installed torch and no second torch
    is downloaded."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    site_dir = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    if site_dir:
        sys.path.append(site_dir)
        try:
            import torch

            return torch
        except ImportError:
            pass
    raise SystemExit(
        "dctkd_ext builds against an installed PyTorch and found none for "
        f"{sys.executable}: install torch first (`pip install -r requirements-dev.txt` or `pip install torch`)"
    )


torch = import_installed_torch()
from setuptools import find_packages, setup  # noqa: E402

# ninja (a pip package) sits next to the interpreter, which need not be on PATH (an unactivated venv).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
CUDA_PLAN = plan_cuda_build(torch.version.cuda)
if CUDA_PLAN.toolkit is not None:
    # torch guesses its own CUDA_HOME at import (the parent of nvcc's folder, wrong for a wrapper
    # script): give it the resolved toolkit before and after the import.
    os.environ["CUDA_HOME"] = CUDA_PLAN.toolkit.root
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if CUDA_PLAN.toolkit is not None:
    cpp_extension.CUDA_HOME = CUDA_PLAN.toolkit.root
else:
    print(f"dctkd_ext: CUDA kernels skipped ({CUDA_PLAN.note}); building the CPU ops only; {SKIP_HINT}",
          file=sys.stderr)

def build_info_text() -> str:
    # Read at import time: an extension built against one torch and loaded under another fails
    # with a clear "rebuild" message instead of an undefined-symbol trace.
    t = CUDA_PLAN.toolkit
    toolkit = {"path": t.root, "version": t.version, "found_by": t.found_by} if t else None
    return (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {t is not None!r}\n"
        f"CUDA_TOOLKIT = {toolkit!r}\n"
        f"CUDA_NOTE = {CUDA_PLAN.note!r}\n"
        f"VERSION = {VERSION!r}\n"
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """build_ext that also writes dctkd_ext/_build_info.py (in the source tree for editable and
    in-place builds, and into the wheel's build tree otherwise). Other setup.py commands write nothing."""

    def run(self):
        text = build_info_text()
        targets = [os.path.join(ROOT, "dctkd_ext", "_build_info.py")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "dctkd_ext", "_build_info.py"))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
        super().run()


def extension():
    with_cuda = CUDA_PLAN.toolkit is not None
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    ldflags = ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # sm_90 SASS for the H100/H200 plus compute_90 PTX that newer GPUs JIT; override with
        # TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX").
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        return CUDAExtension(
            "dctkd_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DDCTKD_WITH_CUDA"], "nvcc": nvcc + ["-DDCTKD_WITH_CUDA"]},
            extra_link_args=ldflags,
            py_limited_api=True,
        )
    return CppExtension(
        "dctkd_ext._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
        py_limited_api=True,
    )


packages = find_packages(include=["dctkd_ext", "dctkd_ext.*"])
package_dir = {}
if os.path.isdir(os.path.join(ROOT, "python", "dctkd_train")):
    packages += ["dctkd_train"] + [
        "dctkd_train." + p for p in find_packages(os.path.join(ROOT, "python", "dctkd_train"))
    ]
    package_dir["dctkd_train"] = "python/dctkd_train"

setup(
    name="dctkd_ext",
    version=VERSION,
    description="Fused CUDA/Triton/C++ kernels for frequency-domain knowledge distillation (DCT-KD, FAM-KD)",
    packages=packages,
    package_dir=package_dir,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["dctkd-train = dctkd_train.cli:main"]},
    python_requires=">=3.9",
    # The range the code supports; the exact torch it is tested with is pinned in requirements-dev.txt.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "scipy", "expecttest"],
        "bench": ["matplotlib"],
        "train": ["matplotlib"],
        "vision": ["torchvision"],
        "timm": ["timm>=1.0"],
        "torchdistill": ["torchdistill>=1.1"],
    },
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    zip_safe=False,
)
