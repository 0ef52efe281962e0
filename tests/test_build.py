"""The build: the extension loads, reports how it was built, and refuses a different torch clearly."""

import subprocess
import sys

import torch

import dctkd_ext


def test_build_info():
    info = dctkd_ext.BUILD_INFO
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    assert hasattr(torch.ops.dctkd_ext, "dct_at_loss")


def test_other_torch_gives_a_rebuild_message():
    # as if the extension had been built against another torch: a clear ImportError, no symbol trace
    code = "import torch; torch.__version__ = '1.0.0+other'; import dctkd_ext"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "built against torch" in out.stderr and "pip install -e ." in out.stderr
    assert "undefined symbol" not in out.stderr
