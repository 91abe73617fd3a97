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


def test_the_column_sum_launch_has_the_row_lanes_the_kernels_add():
    """write_column_chunk's shared array holds COLUMN_ROWS lanes and adds blockDim.y of
    them: a launch with more row lanes would write past it."""
    from nanogpt_np.kernels import fused

    lanes = re.search(r"#define COLUMN_ROWS (\d+)", (loader.KERNEL_DIR / "common.cuh").read_text())
    assert lanes and fused.COLUMN_BLOCK[1] == int(lanes.group(1))


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


# ---- the FlashAttention-2 kernels' instruction mix and resources, for sm_90 ----

FA2_KERNELS = [name for name in FILES["attention_mma.cu"].names if name.startswith("flash_attention_fa2_")]
# the two that move tiles: their PTX must use the asynchronous copies and ldmatrix
TILE_KERNELS = {"flash_attention_fa2_forward", "flash_attention_fa2_backward"}
TILE_INSTRUCTIONS = ("cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group",
                     "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                     "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")


def _mangled_base(name):
    """The Itanium-mangled prefix of a kernel template name: _Z<len><name>I."""
    base = name.split("<")[0]
    return f"{len(base)}{base}I"


@pytest.fixture(scope="module")
def fa2_build(tmp_path_factory):
    """ptxas's per-kernel report (-Xptxas -v) and the PTX of attention_mma.cu for sm_90."""
    tmp = tmp_path_factory.mktemp("fa2_sm90")
    kf = FILES["attention_mma.cu"]
    refs = ",\n".join(f"    (void*)&{name}" for name in kf.names)
    unit = tmp / "instantiate.cu"
    unit.write_text(f'#include "{kf.path}"\nvoid* nanogpt_kernels[] = {{\n{refs}\n}};\n')
    reports = {}
    cubin = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp / "k.cubin"),
                            str(unit)], capture_output=True, text=True)
    assert cubin.returncode == 0, cubin.stderr
    for block in cubin.stderr.split("Compiling entry function")[1:]:
        mangled = block.split("'")[1]
        numbers = dict(
            stack=int(re.search(r"(\d+) bytes stack frame", block).group(1)),
            spill_stores=int(re.search(r"(\d+) bytes spill stores", block).group(1)),
            spill_loads=int(re.search(r"(\d+) bytes spill loads", block).group(1)),
            registers=int(re.search(r"Used (\d+) registers", block).group(1)),
            smem=int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", block)) else 0)
        reports[mangled] = numbers
    ptx = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", "-o", str(tmp / "k.ptx"), str(unit)],
                         capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    entries = {}
    for body in (tmp / "k.ptx").read_text().split(".entry ")[1:]:
        entries[body.split("(")[0].strip()] = body
    return reports, entries


def _find(table, name):
    hits = [v for k, v in table.items() if _mangled_base(name) in k]
    assert len(hits) == 1, f"{name}: {len(hits)} matching entries among {sorted(table)}"
    return hits[0]


@needs_nvcc
@pytest.mark.parametrize("name", FA2_KERNELS)
def test_fa2_kernels_do_not_spill_and_use_the_async_copies_and_ldmatrix(fa2_build, name):
    """No spills and no local-memory stack frame (ptxas for sm_90), a single
    block's static shared memory within 48 KB; the tile kernels' PTX has cp.async
    (with its commit and wait), ldmatrix.x4 and its .trans form, and the bf16 mma."""
    reports, entries = fa2_build
    report = _find(reports, name)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (name, report)
    assert report["stack"] == 0, (name, report)
    assert report["smem"] <= loader.STATIC_SHARED_LIMIT and 0 < report["registers"] <= 255, (name, report)
    if name.split("<")[0] in TILE_KERNELS:
        body = _find(entries, name)
        missing = [i for i in TILE_INSTRUCTIONS if i not in body]
        assert not missing, f"{name}'s PTX lacks {missing}"
