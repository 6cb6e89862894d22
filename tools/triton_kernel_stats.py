"""Compile the pack kernels for sm_90 on a machine without a GPU and report what the code does.

    python tools/triton_kernel_stats.py [--config 64 64 4] [--layout cutlass] [--dtype bf16] [--json]
    python tools/triton_kernel_stats.py --lines 25     # where the instructions come from

For the forward and backward packers (kernels/triton_kernels/forward.py, backward.py) and the dense-GEMM engine's
backward pass (backward_dense.py) at one tile configuration:
registers and spill stack per thread, shared memory, barriers, layout conversions, the width of
every global load/store instruction, and SASS instructions per thread (the kernels have no loops,
so this is also what each thread executes). ``--lines N``
attributes the SASS to source lines (the N costliest, with their main opcodes). Arguments are specialized as Triton does at run time for
aligned tensors (pointers 16-byte aligned, sizes divisible by 16), otherwise the counts mislead
(without it every access is a scalar 2-byte one). Cheap evidence before spending GPU time; it does
not replace measurements (docs/performance.md has the ones that decided). Needs TRITON_INTERPRET
unset (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_sparse24.kernels.triton_kernels import backward, backward_dense, forward, meta  # noqa: E402

_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signatures(dtype: str):
    p = _DT[dtype]
    fwd = dict(y1_ptr=p, out_ptr=p, mask_ptr="*u8", vals_ptr=p, meta_ptr="*i16", dvals_ptr=p, counts_ptr="*i32",
               scale_ptr="*fp32", row_ids_ptr="*i64", n_rows="i32", n_cols="i32", scale_val="fp32", k1="i32", k2="i32")
    bwd = dict(g2_ptr=p, s2_vals_ptr=p, s2_meta_ptr="*i16", d_vals_ptr=p, dense_pos_ptr="*i32", g1_vals_ptr=p,
               g1t_vals_ptr=p, g1t_meta_ptr="*i16", g1_dense_ptr=p, s2t_vals_ptr=p, s2t_meta_ptr="*i16",
               s2_dense_ptr=p, db1_ptr="*fp32", perm_ptr="*i64", n_tokens="i32", n_feats="i32")
    dense_bwd = dict(g2_ptr=p, s2_ptr=p, d_ptr=p, perm_ptr="*i64", dense_pos_ptr="*i32", g1_ptr=p, g1fw_ptr=p,
                     s2fw_ptr=p, db1_ptr="*fp32", n_tokens="i32", n_feats="i32")
    return fwd, bwd, dense_bwd


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, divisible=("n_rows", "n_cols", "n_tokens",
                                                                                   "n_feats"), maxnreg=None):
    """Triton's compile for sm_90 with run-time-like specialization; returns the compiled kernel."""
    names = list(fn.arg_names)
    # constexpr parameters with a default (e.g. G1_DENSE) take it, as at a call that omits them
    constexprs = {**{q.name: q.default for q in fn.params if q.is_constexpr and q.has_default}, **constexprs}
    spec = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
            if t.startswith("*") or a in divisible}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=spec)
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _nvidia_tool(name: str) -> Path | None:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return tool if tool.exists() else None


def _run_on_cubin(kernel, argv: list[str]) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run(argv + [f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


_SASS_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def source_lines(kernel, top: int = 25) -> list[dict]:
    """SASS instructions per source line (nvdisasm with line info), the ``top`` costliest first:
    [{"file", "line", "instructions", "opcodes": {opcode: count}}]."""
    tool = _nvidia_tool("nvdisasm")
    if tool is None:
        return []
    per_line, ops = collections.Counter(), collections.defaultdict(collections.Counter)
    where = ("?", 0)
    for text in _run_on_cubin(kernel, [str(tool), "-g", "-c"]).splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', text)
        if m:
            where = (Path(m.group(1)).name, int(m.group(2)))
            continue
        m = _SASS_OP.search(text)
        if m:
            per_line[where] += 1
            ops[where][m.group(1).split(".")[0]] += 1
    return [{"file": f, "line": n, "instructions": c, "opcodes": dict(ops[(f, n)].most_common(4))}
            for (f, n), c in per_line.most_common(top)]


# Issue pipes of sm_90 SASS opcodes (Nsight Compute's pipe names). Per SM sub-partition the ALU and
# the FMA-heavy pipe (IMAD) take one warp instruction every 2 cycles; FP32 FFMA/FMUL/FADD go to either
# FMA pipe (one per cycle); every instruction costs one issue slot.
_PIPES = {
    "alu": {"LOP3", "LOP", "SEL", "FSEL", "ISETP", "FSETP", "FMNMX", "IMNMX", "VIMNMX", "PRMT", "SHF", "SGXT",
            "IADD3", "LEA", "P2R", "R2P", "PLOP3", "FLO", "BREV", "IABS", "BMSK", "VIADD", "HSETP2",
            "HMNMX2", "VIMNMX3", "IADD", "ICMP"},
    "fma_heavy": {"IMAD", "IMUL", "IDP"},
    "fma": {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FSWZADD"},
    "xu": {"MUFU", "F2F", "F2I", "I2F", "F2FP", "I2FP", "POPC", "FRND"},
    "lsu": {"LDG", "STG", "LDS", "STS", "LD", "ST", "SHFL", "ATOM", "ATOMG", "RED", "REDG", "LDL", "STL", "LDC",
            "LDSM", "ATOMS"},
}


def pipe_counts(sass: str) -> dict:
    """SASS instructions (``cuobjdump -sass`` text) per issue pipe (see _PIPES; "other": moves,
    branches, barriers, S2R...) and the cycles per warp that each bound implies: issue (all), alu
    (2 per ALU instruction), heavy (2 per IMAD)."""
    counts = collections.Counter()
    for op in _SASS_OP.findall(sass):
        base = op.split(".")[0]  # IMAD.WIDE -> IMAD: the pipe does not depend on the modifiers
        counts[next((p for p, names in _PIPES.items() if base in names), "other")] += 1
    total = sum(counts.values())
    return {**dict(counts), "bound_cycles": {"issue": total, "alu": 2 * counts["alu"], "heavy": 2 * counts["fma_heavy"]}}


def stats(kernel) -> dict:
    """Per-thread registers/stack (cuobjdump, when the Triton wheel ships it), shared memory,
    barriers, layout conversions and global memory instructions by width."""
    ptx = kernel.asm["ptx"]
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st|red|atom)\.global[\w.]*)",
                                                             ptx, re.M))
    out = {"shared_bytes": kernel.metadata.shared, "barriers": len(re.findall(r"\bbar\.sync\b", ptx)),
           "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"), "global_ops": dict(ops)}
    tool = _nvidia_tool("cuobjdump")
    if tool is not None:
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", _run_on_cubin(kernel, [str(tool), "-res-usage"]), re.S)
        if m:
            out["registers"], out["stack_bytes"] = int(m.group(1)), int(m.group(2))
        sass = _run_on_cubin(kernel, [str(tool), "-sass"])
        out["sass_instructions"] = len(_SASS_OP.findall(sass))
        out["pipes"] = pipe_counts(sass)
    return out


def pack_kernel_stats(config=None, layout: str = "cutlass", dtype: str = "bf16", lines: int = 0) -> dict:
    """{"forward": stats, "backward": stats, "dense_backward": stats} of the two packers and the dense-GEMM
    engine's backward pass, each at ``config`` (BT, BF, warps[, maxnreg]; None: its own default); ``lines``
    > 0 adds each kernel's costliest source lines (see ``source_lines``)."""
    fwd_sig, bwd_sig, dense_bwd_sig = _signatures(dtype)
    out = {}
    for name, fn, sig, default, extra in (
        ("forward", forward._relu2_sparsify24_kernel, fwd_sig, forward.FWD_CONFIG,
         dict(METHOD=0, SCALE_FROM_PTR=False, WRITE_DENSE=False, WRITE_PACKED=True, WRITE_COUNTS=True,
              WRITE_DVALS=dtype != "bf16")),  # method "naive", as the FFN launches it
        ("backward", backward._pack_backward_kernel, bwd_sig, backward.BWD_CONFIG,
         dict(HAS_DB1=True, HAS_DVALS=dtype != "bf16", HAS_PERM=True, EVEN=True)),  # as the layer runs it
        ("dense_backward", backward_dense._sparsify_backward_dense_kernel, dense_bwd_sig,
         backward_dense.DENSE_BWD_CONFIG, dict(HAS_D=dtype != "bf16", HAS_PERM=True, HAS_DB1=True)),
    ):
        bt, bf, warps, *maxnreg = config or default
        consts = {**extra, "BT": bt, "BF": bf}
        if "LAYOUT" in fn.arg_names:  # the dense-GEMM engine's passes write no metadata
            consts["LAYOUT"] = meta.layout_id(layout)
        kernel = compile_sm90(fn, sig, consts, warps, maxnreg=maxnreg[0] if maxnreg else None)
        out[name] = stats(kernel)
        if lines:
            out[name]["source_lines"] = source_lines(kernel, lines)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=int, nargs="+", help="BT BF warps [maxnreg] (default: each kernel's)")
    ap.add_argument("--layout", default="cutlass", choices=["cutlass", "cusparselt"])
    ap.add_argument("--dtype", default="bf16", choices=list(_DT))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--lines", type=int, default=0, metavar="N",
                    help="also list the N source lines with the most SASS instructions per kernel")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    result = pack_kernel_stats(args.config, args.layout, args.dtype, args.lines)
    if args.json:
        print(json.dumps(result))
        return
    for name, s in result.items():
        where = s.pop("source_lines", [])
        print(f"{name}: {s}")
        for w in where:
            print(f"  {w['instructions']:5d}  {w['file']}:{w['line']}  {w['opcodes']}")


if __name__ == "__main__":
    main()
