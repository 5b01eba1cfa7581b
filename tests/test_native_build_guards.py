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


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_cuda_unaligned_word_access_helpers_on_the_host(tmp_path):
    """The CUDA fingerprint kernel reads (and copies) misaligned sources with
    load_words16/store_words16 from cuda_vec.h, host+device code: compiled for the host here and
    checked against memcpy at every offset 0..15 with every alignment the kernel picks."""
    src = tmp_path / "t.cpp"
    src.write_text(r'''
#include <cstdio>
#include <cstring>
#include "memstate/cuda_vec.h"
int main() {
  alignas(16) unsigned char buf[64], out[64];
  for (int i = 0; i < 64; ++i) buf[i] = static_cast<unsigned char>(i * 37 + 11);
  for (int off = 0; off < 16; ++off) {
    const unsigned char* p = buf + off;
    const int align = memstate::address_align(p);
    if (align != (off == 0 ? 16 : off % 4 == 0 ? 4 : 1)) { std::printf("align %d at %d\n", align, off); return 1; }
    uint32_t w[4], want[4];
    memstate::load_words16(p, align == 16 ? 4 : align, w);
    std::memcpy(want, p, 16);  // x86 is little-endian, as msfp1's words
    if (std::memcmp(w, want, 16) != 0) { std::printf("load at %d\n", off); return 1; }
    std::memset(out, 0, sizeof out);
    memstate::store_words16(out + off, align == 16 ? 4 : align, w);
    if (std::memcmp(out + off, p, 16) != 0) { std::printf("store at %d\n", off); return 1; }
  }
  std::printf("ok\n");
  return 0;
}
''')
    exe = tmp_path / "t"
    build = subprocess.run([CXX, "-std=c++17", "-O2", f"-I{INCLUDE}", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
