"""snl_kernels.perf.cuda_sass: the sm_90 facts of the CUDA kernels of csrc/.

The compile tests need nvcc and a CUDA build of PyTorch (its ATen/cuda headers) in the running
interpreter; the first run compiles csrc/*.cu (about a minute on 2 cores), later runs read
build/perf_cuda/. The splitter and occupancy tests run anywhere.
"""

import re
from pathlib import Path

import pytest

from snl_kernels.perf import cuda_sass
from snl_kernels.perf.compiled import analyse_sass

ROOT = Path(__file__).resolve().parents[1]
ANON = "snl::(anonymous namespace)::"

SYNTHETIC_SASS = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

\tcode for sm_90
\t\tFunction : _ZN3snl6kernelIfEEvPKf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x0000000402047981 */
        /*0010*/                   HMMA.1688.F32.TF32 R8, R4, R12, R8 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   EXIT ;
\t\t..........



\t\tFunction : _ZN3snl5otherEv
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   FFMA R0, R1, R2, R3 ;
        /*0010*/                   FFMA R0, R1, R2, R0 ;
        /*0020*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], RZ ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
\t\t..........
"""


def test_split_sass_keeps_each_function_to_itself():
    parts = cuda_sass.split_sass(SYNTHETIC_SASS)
    assert list(parts) == ["_ZN3snl6kernelIfEEvPKf", "_ZN3snl5otherEv"]
    first, second = (analyse_sass(text) for text in parts.values())
    assert first == {"hgmma": 0, "hmma": 1, "ffma": 0, "widest_load_bits": 128, "bar_sync": 1,
                     "wgmma_waits": 0}
    assert second == {"hgmma": 1, "hmma": 0, "ffma": 2, "widest_load_bits": 0, "bar_sync": 0,
                      "wgmma_waits": 1}
    assert "EXIT" in parts["_ZN3snl6kernelIfEEvPKf"]
    assert "EXIT" not in parts["_ZN3snl5otherEv"]


def test_names_and_occupancy():
    demangled = f"void {ANON}k<float, 32, 4>(float const*, {ANON}Strides4, long)"
    assert cuda_sass.kernel_name(demangled) == f"{ANON}k<float, 32, 4>"
    assert cuda_sass.kernel_name(f"{ANON}cram_fwd_rows_kernel(float*, int)") == (
        f"{ANON}cram_fwd_rows_kernel")
    assert cuda_sass.base_name(f"{ANON}k<{ANON}Feature<c10::Half>, true>") == "k"
    facts = {"registers": 64, "shared_bytes": 32288, "max_threads": 256}
    assert cuda_sass.blocks_per_sm(facts, 256) == 4  # registers: 64 x 256 x 4 = 65536
    assert cuda_sass.blocks_per_sm(facts, 512) == 0  # over the launch bound
    assert cuda_sass.blocks_per_sm({"registers": 16, "shared_bytes": 0}, 32) == 32
    assert cuda_sass.blocks_per_sm({"registers": 32, "shared_bytes": 100 * 1024}, 128) == 2


def _kernels_in_csrc() -> set[str]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "csrc").iterdir()) if p.is_file())
    text = re.sub(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)", " ", text)
    return set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", text))


@pytest.fixture(scope="module")
def facts():
    reason = cuda_sass.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cuda_sass.kernel_facts(ROOT)


@pytest.mark.slow
def test_every_global_kernel_is_found(facts):
    declared = _kernels_in_csrc()
    assert len(declared) >= 20
    assert declared <= {cuda_sass.base_name(name) for name in facts}
    bwd = facts[f"{ANON}cosine_distances_bwd_kernel<float>"]
    assert bwd["registers"] > 0
    assert bwd["max_threads"] == 256


@pytest.mark.slow
def test_tf32_affinity_kernels_use_mma_sync_not_wgmma(facts):
    mma = [name for name in facts if re.search(r"intra_tiled_\w+_kernel<float, false, true>",
                                               name)]
    assert len(mma) == 2, mma
    for name in mma:
        assert facts[name]["hmma"] > 0, (name, facts[name])
        assert facts[name]["hgmma"] == 0, (name, facts[name])
    fma_only = facts[f"{ANON}intra_tiled_fwd_kernel<float, false, false>"]
    assert fma_only["hmma"] == 0
    assert fma_only["ffma"] > 0
