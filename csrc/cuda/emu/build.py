# Builds the emulated extension from the sources prep.py wrote. usage: python build.py SRC_DIR BUILD_DIR
# EMU_CFLAGS: extra compiler flags, e.g. -DDCTKD_PHI_SCRATCH_BYTES=200000 (phi's global scratch in waves).
# EMU_SAN=address,undefined builds with sanitizers (run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)).
import os, sys, glob, torch
from torch.utils.cpp_extension import load
san = os.environ.get("EMU_SAN", "")
flags = ["-std=c++20", "-O1", "-g", "-Wno-unknown-pragmas", "-pthread"] + os.environ.get("EMU_CFLAGS", "").split()
ldflags = ["-pthread"]
if san:
    flags += ["-fsanitize=" + san, "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=" + san]
load(name="dctkd_emu" + ("_" + san.replace(",", "_") if san else ""), sources=sorted(glob.glob(os.path.join(sys.argv[1], "*.cpp"))),
     extra_cflags=flags, extra_ldflags=ldflags, build_directory=sys.argv[2],
     is_python_module=False, verbose=False)
print("built")
