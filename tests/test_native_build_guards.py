"""Fast math cannot sneak into a build (issue 16 item 9): the shared header stops a host
compile with -ffast-math, and every CUDA kernel stops an nvcc compile with --use_fast_math,
-ftz=true or -prec-div=false (nvcc 13 defines no macro for these, so the kernels carry an
NVVM-reflect guard that leaves ptxas an unresolved symbol; see csrc/include/memstate/macros.h)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "csrc", "include")
CXX = shutil.which("g++") or shutil.which("c++")


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.parametrize("flags, ok", [([], True), (["-ffast-math"], False), (["-Ofast"], False)])
def test_host_fast_math_refused(tmp_path, flags, ok):
    src = tmp_path / "t.cpp"
    src.write_text('#include "memstate/optim_math.h"\nint main() { return 0; }\n')
    proc = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", f"-I{INCLUDE}", *flags, str(src)],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
    if not ok:
        assert "ffast-math" in proc.stderr


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("flags, ok", [
    ([], True), (["--use_fast_math"], False), (["-ftz=true"], False),
])
def test_nvcc_fast_math_refused(tmp_path, flags, ok):
    src = os.path.join(ROOT, "csrc", "cuda", "fingerprint_kernels.cu")
    cmd = [_nvcc(), "-c", "-arch=sm_90", "-std=c++17", "--fmad=false", "-O3", f"-I{INCLUDE}",
           f"-I{os.path.join(ROOT, 'csrc')}", *flags, src, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
    if not ok:
        assert "memstate_error_built_with_fast_math" in proc.stderr
