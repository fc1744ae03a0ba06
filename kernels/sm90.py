"""Compile mixdit's Triton kernels for Hopper (sm_90) without a GPU and read what the compiler made of them.

Triton ships ptxas and cuobjdump, so on any machine (CI included) a kernel can be compiled for sm_90 and its
shared memory, registers, spills and SASS inspected. Used by ``tests/test_kernel_resources.py`` (the default configs
must fit an SM) and ``benchmarks/kernel_sass.py`` (why a config is as fast as it is). Needs Triton's NVIDIA backend;
never the interpreter (``TRITON_INTERPRET`` must be unset before Triton is imported).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

HOPPER_SMEM_PER_BLOCK = 232448  # bytes one block may use on sm_90 (227 KB)
HOPPER_SMEM_PER_SM = 233472  # 228 KB per SM, of which each resident block also takes 1 KB reserved
HOPPER_REGS_PER_SM = 65536
HOPPER_WARPS_PER_SM = 64  # 2,048 resident threads
HOPPER_BLOCKS_PER_SM = 32

# kernel argument names -> Triton signature types (pointer names are upper case, but for these int32 counts)
_INT32_SCALARS = {"H", "NB"}
_FP32_PTRS = {"LSE", "DELTA", "DQACC", "LSE_PART"}
_INT32_PTRS = {"KV_COUNT", "KV_INDEX", "KV_LEN", "ROW_SEL", "KV_GROUP", "QBUF", "SLOT_SEL", "KV_FULL", "PAIR_Q",
               "PAIR_DST", "LIST_START", "LIST_LEN", "TILE_LIST", "TILE_J", "TILE_START", "TILE_COUNT", "KV_TILE_LEN"}


@dataclass
class Compiled:
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill_bytes: int  # stack (local memory) per thread
    warps: int
    sass: str = field(repr=False)

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by shared memory, registers and the SM's warp and block limits (the
        occupancy the kernel can get)."""
        by_smem = HOPPER_SMEM_PER_SM // (self.shared + 1024)
        regs = -(-self.registers // 8) * 8 * 32 * self.warps  # allocated in units of 8 per thread
        by_warps = HOPPER_WARPS_PER_SM // self.warps
        return max(0, min(by_smem, HOPPER_REGS_PER_SM // regs, by_warps, HOPPER_BLOCKS_PER_SM))

    def loop_mix(self) -> dict:
        """Instruction counts per thread in the innermost loop that issues tensor-core MMAs (HGMMA): the shortest
        backward branch whose range holds an HGMMA (slow paths such as mbarrier retry loops span more)."""
        lines = []
        for line in self.sass.splitlines():
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)([.\w]*)\s*(.*)", line)
            if m:
                lines.append((int(m.group(1), 16), m.group(3), m.group(4), m.group(5)))
        best = None
        for addr, op, _, rest in lines:
            target = re.match(r"(0x[0-9a-f]+)", rest)
            if op == "BRA" and target and int(target.group(1), 16) < addr:
                lo = int(target.group(1), 16)
                if any(o == "HGMMA" and lo <= a <= addr for a, o, _, _ in lines):
                    if best is None or addr - lo < best[1] - best[0]:
                        best = (lo, addr)
        if best is None:
            return {}
        mix = collections.Counter(op + (".EX2" if op == "MUFU" and ".EX2" in sfx else "")
                                  for a, op, sfx, _ in lines if best[0] <= a <= best[1])
        return dict(mix.most_common())


def _signature(kernel) -> dict:
    sig = {}
    for p in kernel.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n.isupper() and n not in _INT32_SCALARS:
            sig[n] = "*fp32" if n in _FP32_PTRS else "*i32" if n in _INT32_PTRS else "*bf16"
        else:
            sig[n] = "fp32" if "scale" in n else "i32"
    return sig


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, sass: bool = False) -> Compiled:
    """Compile a ``@triton.jit`` kernel of mixdit's (bf16 tensors, int32 layouts) for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params]
    src = ASTSource(fn=kernel, signature=_signature(kernel),
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout if sass else ""
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return Compiled(shared=ck.metadata.shared, registers=int(regs.group(1)) if regs else -1,
                    spill_bytes=int(stack.group(1)) if stack else 0, warps=num_warps, sass=text)
