"""The head's Triton kernels compile for the GPU (sm_90, the H100 and H200), here on the CPU.

Triton's interpreter, which the other kernel tests run on the CPU, executes a kernel's Python with NumPy: it never
types or lays out the program, so a kernel can pass every interpreted case and fail to compile on the GPU (a
constexpr used as a runtime value, a block shape ``tl.dot`` refuses, a load of the wrong pointer type). Compiling
each kernel ahead of time for sm_90, at the block sizes and switches the launches use, finds those without a GPU.
"""

from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")

F32, U8, I64, I32, SCALAR = "*fp32", "*u8", "*i64", "i32", "fp32"

#: ``region_kernel``'s arguments but the region validity's pointer, whose type differs between its two launches.
REGION = {
    "texture_ptr": F32, "features_ptr": F32, "valid_ptr": F32, "terms_ptr": F32, "unit_ptr": F32, "gh": I32,
    "gw": I32, "rw": I32, "regions": I32, "width": I32, "width_float": SCALAR, "texture_channels": I32,
}  # fmt: skip

#: name -> (module of arrcoc.stages, kernel, pointer and scalar types by argument, constexprs, launch options).
KERNELS: dict[str, tuple[str, str, dict[str, str], dict[str, object], dict[str, object]]] = {
    "normalize": (
        "_normalize_triton", "normalize_kernel",
        {"score_ptr": F32, "valid_ptr": U8, "out_ptr": F32, "maps": I32, "length": I32},
        {"BLOCK": 256}, {},
    ),
    "region-terms": (
        "_region_stats_triton", "region_kernel", {**REGION, "region_valid_ptr": U8},
        {"SIDE": 4, "P_BLOCK": 16, "D_BLOCK": 128, "TERMS": True, "UNIT": False}, {},
    ),
    "region-units": (  # the unit launch passes its output for the terms' pointers
        "_region_stats_triton", "region_kernel", {**REGION, "region_valid_ptr": F32},
        {"SIDE": 4, "P_BLOCK": 16, "D_BLOCK": 128, "TERMS": False, "UNIT": True}, {},
    ),
    "propositional-mix": (
        "_region_stats_triton", "mix_kernel",
        {"terms_ptr": F32, "valid_ptr": U8, "weights_ptr": F32, "out_ptr": F32, "regions": I32},
        {"K": 4, "R_BLOCK": 64}, {},
    ),
    "perspectival-sums": (
        "_perspectival_triton", "sums_kernel",
        {"features_ptr": F32, "texture_ptr": F32, "valid_ptr": F32, "feature_sum_ptr": F32, "lab_sum_ptr": F32,
         "patches": I32, "width": I32, "channels": I32},
        {"P_BLOCK": 64, "D_BLOCK": 64}, {},
    ),
    "perspectival-terms": (
        "_perspectival_triton", "terms_kernel",
        {"features_ptr": F32, "texture_ptr": F32, "valid_ptr": F32, "feature_sum_ptr": F32, "lab_sum_ptr": F32,
         "terms_ptr": F32, "rows": I32, "cols": I32, "width": I32, "channels": I32},
        {"SURROUND": 5, "P_BLOCK": 32, "D_BLOCK": 128}, {},
    ),
    "perspectival-regions": (
        "_perspectival_triton", "regions_kernel",
        {"terms_ptr": F32, "valid_ptr": F32, "weights_ptr": F32, "out_ptr": F32, "rows": I32, "cols": I32,
         "side": I32, "region_cols": I32, "regions": I32},
        {"N_BLOCK": 256, "R_BLOCK": 16, "S_BLOCK": 16}, {"num_warps": 1},
    ),
    "coupling": (
        "_participatory_triton", "coupling_kernel",
        {"unit_ptr": F32, "query_ptr": F32, "mask_ptr": U8, "out_ptr": F32, "patches": I32, "tokens": I32,
         "width": I32},
        {"N_BLOCK": 64, "L_BLOCK": 16, "D_BLOCK": 32}, {"enable_fp_fusion": True},
    ),
    "participatory-peak": (
        "_participatory_triton", "peak_kernel",
        {"coupling_ptr": F32, "valid_ptr": F32, "mask_ptr": U8, "out_ptr": F32, "gh": I32, "gw": I32,
         "region_cols": I32, "regions": I32, "side": I32, "tokens": I32},
        {"R_BLOCK": 64, "P_BLOCK": 16, "L_BLOCK": 4}, {"num_warps": 1},
    ),
    "frame": (
        "_frame_triton", "frame_kernel",
        {"flat_ptr": F32, "valid_ptr": F32, "colour_ptr": F32, "out_ptr": U8, "work_ptr": "*i32", "gh": I32, "gw": I32,
         "steps": I32, "solid": SCALAR, "touched": SCALAR, "chroma": SCALAR, "flat_image": I32, "flat_patch": I32,
         "colour_image": I32, "colour_patch": I32, "colour_channel": I32},
        {"BLOCK": 256, "COLOUR": True}, {"num_warps": 1},
    ),
    "pick-extent": (
        "_pick_setup_triton", "extent_kernel",
        {"gram_ptr": F32, "lab_ptr": F32, "valid_ptr": U8, "weight_ptr": F32, "extent_ptr": F32, "patches": I32,
         "lab_image": I32, "lab_patch": I32, "colour_share": SCALAR},
        {"P_BLOCK": 16, "Q_BLOCK": 256, "COLOUR": True, "WEIGHTED": True}, {},
    ),
    "pick-setup": (
        "_pick_setup_triton", "pick_setup_kernel",
        {"gram_ptr": F32, "lab_ptr": F32, "valid_ptr": U8, "weight_ptr": F32, "priority_ptr": F32, "frame_ptr": U8,
         "extent_ptr": F32, "weighted_ptr": F32, "score_ptr": F32, "patches": I32, "lab_image": I32,
         "lab_patch": I32, "colour_share": SCALAR},
        {"P_BLOCK": 16, "Q_BLOCK": 256, "B_BLOCK": 16, "COLOUR": True, "WEIGHTED": True, "PRIORITY": True,
         "FRAME": True}, {},
    ),
    "balance": (
        "_balance_triton", "balance_kernel",
        {"scores_ptr": F32, "query_mask_ptr": U8, "patch_valid_ptr": F32, "budget_ptr": I64, "similarity_ptr": F32,
         "novel_ptr": F32, "knobs_ptr": F32, "relevance_ptr": F32, "weights_ptr": F32, "report_ptr": F32,
         "redundancy_ptr": F32, "regions": I32, "tokens": I32, "patches": I32, "gh": I32, "gw": I32, "rw": I32,
         "log_t_high": SCALAR, "log_t_span": SCALAR},
        {"R_BLOCK": 64, "L_BLOCK": 4, "N_BLOCK": 256, "SIDE": 4, "HAS_BUDGET": True, "COVERS": True},
        {"num_warps": 1},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90(name: str) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, kernel_name, types, constexprs, options = KERNELS[name]
    kernel = getattr(importlib.import_module(f"arrcoc.stages.{module_name}"), kernel_name)
    names = [p.name for p in kernel.params]
    assert sorted(names) == sorted([*types, *constexprs]), f"{name}: the signature above is not the kernel's"
    source = ASTSource(
        fn=kernel,
        signature={n: types.get(n, "constexpr") for n in names},
        constexprs={(names.index(n),): value for n, value in constexprs.items()},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False, **options}
    )
    assert compiled.asm["cubin"], f"{name}: no machine code"
