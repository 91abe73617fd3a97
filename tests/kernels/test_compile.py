"""Every CUDA source compiles: with nvcc for sm_80 and sm_90, and with NVRTC, the
run-time compiler cupy.RawModule uses on the GPU (no host headers, template name
expressions). Neither needs a GPU."""
import re
import shutil
import subprocess

import pytest

import nanogpt_np.kernels  # noqa: F401  (imports every wrapper: ALL_FILES is complete)
from nanogpt_np.kernels import loader
from tests.kernels.nvrtc import CUPY_OPTIONS, NVRTC, find_libnvrtc

ARCHS = ["sm_80", "sm_90"]  # A100, H100/H200
FILES = {kf.filename: kf for kf in loader.ALL_FILES}
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
LIBNVRTC = find_libnvrtc()
needs_nvrtc = pytest.mark.skipif(LIBNVRTC is None, reason="no libnvrtc (pip install nvidia-cuda-nvrtc)")


def test_every_cu_file_has_a_wrapper_that_declares_all_its_kernels():
    on_disk = sorted(p.name for p in loader.KERNEL_DIR.glob("*.cu"))
    assert sorted(FILES) == on_disk
    for kf in loader.ALL_FILES:
        defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", kf.path.read_text()))
        launched = {name.split("<")[0] for name in kf.names}
        assert defined == launched, f"{kf.filename}: kernels {defined} vs names {launched}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(FILES))
def test_nvcc_compiles(filename, arch, tmp_path):
    kf = FILES[filename]
    # taking each instantiation's address makes nvcc compile it, as NVRTC's name expressions do
    refs = ",\n".join(f"    (void*)&{name}" for name in kf.names)
    unit = tmp_path / f"instantiate_{filename}"
    unit.write_text(f'#include "{kf.path}"\nvoid* nanogpt_kernels[] = {{\n{refs}\n}};\n')
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-Werror", "all-warnings",
           "-o", str(tmp_path / "out.cubin"), str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(FILES))
def test_nvrtc_compiles_what_cupy_will(filename, arch):
    kf = FILES[filename]
    options = loader.NVRTC_OPTIONS + CUPY_OPTIONS + (f"-arch={arch}",)
    lowered, size = NVRTC(LIBNVRTC).compile(kf.source(), kf.filename, options, kf.names)
    assert set(lowered) == set(kf.names) and size > 0
    assert not re.search(r"^\s*#\s*include", kf.source(), re.M)  # the loader pasted common.cuh in


@needs_nvrtc
def test_nvrtc_check_can_fail():
    """The NVRTC check really rejects what cupy.RawModule would: a host header."""
    source = "#include <cmath>\nextern \"C\" __global__ void f(float* x) { x[0] = std::exp(x[0]); }\n"
    with pytest.raises(RuntimeError, match="cmath"):
        NVRTC(LIBNVRTC).compile(source, "bad.cu", ("-arch=sm_80",), [])
