"""Build of dctkd_ext: the C++ ops always, the CUDA ops when a CUDA toolkit and a CUDA build of torch
are present (or FORCE_CUDA=1). Build against the torch you run with:

    pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message only
    raise SystemExit(
        "dctkd_ext builds against an installed PyTorch: `pip install torch` first, then "
        "`pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("DCTKD_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def write_build_info(with_cuda: bool) -> None:
    # Read at import time: an extension built against one torch and loaded under another fails
    # with a clear "rebuild" message instead of an undefined-symbol trace.
    path = os.path.join(ROOT, "dctkd_ext", "_build_info.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"VERSION = {VERSION!r}\n"
    )
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extension():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["dctkd-train = dctkd_train.cli:main"]},
    python_requires=">=3.9",
    # Keep the cap: the CI machine's disk holds torch <= 2.14.1.
    install_requires=["torch>=2.4,<=2.14.1", "numpy"],
    extras_require={
        "test": ["pytest", "scipy", "expecttest"],
        "bench": ["matplotlib"],
        "train": ["matplotlib"],
        "vision": ["torchvision"],
    },
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    zip_safe=False,
)
