"""Compile every kernel of the sparse engine for real NVIDIA GPUs on this machine (no GPU needed) and print,
as JSON, each cubin's resource usage. Run without TRITON_INTERPRET: `python tests/compile_kernels.py 80 90`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from gmixout_cli.kernels import masks, sparse_adamw, sparse_ops  # noqa: E402

F32_SCALARS = ("lr", "beta1", "beta2", "eps", "decay", "step_size", "bc2_sqrt", "scale", "coef")


def _signature(kernel: triton.runtime.jit.JITFunction, pointers: dict[str, str], ints: dict[str, str],
               constexprs: dict[str, object]) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in F32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = ints.get(name, "i32")
    return sig


# What the wrappers launch: deltas, moments and anchor values are fp32, indices int32; the dense target
# weight is fp32 or, with method.weight_dtype=bf16, bf16 (its gradient then reaches the gather in bf16).
_ADAMW = {p: "*fp32" for p in ("val_ptr", "grad_ptr", "m_ptr", "v_ptr", "anchor_ptr")} | {"idx_ptr": "*i32"}
LAUNCHES = [
    (masks._keep_kernel, masks.BLOCK, {"out_ptr": "*i8"}, {"seed": "i64", "threshold": "i64"}, {}, "int8 mask"),
    (sparse_adamw._sparse_adamw_kernel, sparse_adamw.BLOCK, _ADAMW | {"w_ptr": "*fp32"}, {}, {"ANCHORED": False},
     "fp32 weight"),
    (sparse_adamw._sparse_adamw_kernel, sparse_adamw.BLOCK, _ADAMW | {"w_ptr": "*bf16"}, {}, {"ANCHORED": True},
     "bf16 weight"),
    (sparse_ops._gather_add_kernel, sparse_ops.BLOCK,
     {"grad_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*fp32"}, {}, {}, "fp32 gradient"),
    (sparse_ops._gather_add_kernel, sparse_ops.BLOCK,
     {"grad_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*fp32"}, {}, {}, "bf16 gradient"),
    (sparse_ops._fold_in_kernel, sparse_ops.BLOCK, {"w_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*fp32"}, {},
     {}, "fp32 weight"),
    (sparse_ops._fold_in_rounded_kernel, sparse_ops.BLOCK,
     {"w_ptr": "*bf16", "idx_ptr": "*i32", "anchor_ptr": "*fp32", "val_ptr": "*fp32"}, {"seed": "i64"}, {},
     "bf16 weight, stochastic rounding"),
]


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, SHARED, LOCAL, STACK of the cubin's function, from the cuobjdump that ships with triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def main(archs: list[int]) -> None:
    rows = []
    for kernel, block, pointers, ints, flags, what in LAUNCHES:
        constexprs = {"BLOCK": block, **flags}
        sig = _signature(kernel, pointers, ints, constexprs)
        for cc in archs:
            src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
            rows.append({"kernel": kernel.__name__, "launch": what, "arch": cc, "block": block,
                         "num_warps": compiled.metadata.num_warps, "shared_meta": compiled.metadata.shared,
                         "cubin_bytes": len(compiled.asm["cubin"]), **resource_usage(compiled.asm["cubin"])})
    print(json.dumps(rows))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 86, 89, 90])
