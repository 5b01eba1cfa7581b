"""setup.py keeps ninja's build directory in the checkout, so `pip install -e .` (which gives
build_ext a fresh temporary build_temp) does not recompile unchanged sources."""
import os
import runpy
import sys

import pytest
import setuptools
from setuptools import Distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_kwargs():
    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    env = os.environ.get("MEMSTATE_NO_CUDA")
    os.environ["MEMSTATE_NO_CUDA"] = "1"
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")
    finally:
        setuptools.setup = real
        if env is None:
            del os.environ["MEMSTATE_NO_CUDA"]
        else:
            os.environ["MEMSTATE_NO_CUDA"] = env
    return captured


def test_build_temp_is_persistent_even_when_pip_gives_a_temporary_one(setup_kwargs, tmp_path):
    dist = Distribution({"ext_modules": setup_kwargs["ext_modules"], "cmdclass": setup_kwargs["cmdclass"]})
    dist.get_command_obj("build").build_temp = str(tmp_path)  # what PEP 660 editable installs do
    cmd = dist.get_command_obj("build_ext")
    cmd.ensure_finalized()
    assert cmd.build_temp == os.path.join(ROOT, "build", f"temp.{__import__('sysconfig').get_platform()}-"
                                                         f"{sys.implementation.cache_tag}")


def test_headers_are_dependencies(setup_kwargs):
    exts = {e.name: e for e in setup_kwargs["ext_modules"]}
    assert sorted(exts) == ["memstate._C", "memstate._fingerprint"]
    deps = set(exts["memstate._C"].depends)
    for rel in ("csrc/optim_ops.h", "csrc/cpu/kernels.h", "csrc/include/memstate/msfp1.h"):
        assert rel in deps, rel
    assert "csrc/include/memstate/fingerprint_object.h" in exts["memstate._fingerprint"].depends


def test_each_extension_builds_in_its_own_directory(setup_kwargs, tmp_path, monkeypatch):
    """ninja's manifest is written into build_temp: two extensions sharing one overwrote each
    other's, and every build recompiled everything."""
    from torch.utils import cpp_extension

    dist = Distribution({"ext_modules": setup_kwargs["ext_modules"], "cmdclass": setup_kwargs["cmdclass"]})
    cmd = dist.get_command_obj("build_ext")
    cmd.ensure_finalized()
    seen = {}
    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extension",
                        lambda self, ext: seen.setdefault(ext.name, self.build_temp))
    for ext in setup_kwargs["ext_modules"]:
        cmd.build_extension(ext)
    assert seen["memstate._C"] == cmd.build_temp  # where earlier builds left its objects
    assert seen["memstate._fingerprint"] == os.path.join(cmd.build_temp, "_fingerprint")
    assert cmd.build_temp == seen["memstate._C"]  # restored after each
