"""TVM TensorIR kernels for `edgetk::codebook_gemm`, with one schedule per target (llvm, CUDA).

The PrimFunc is written in TVMScript and specialised (at parse time, through closure constants) to one
`TirCodebookShape`: the layer's `CodebookFormat` facts plus the number of input rows and the dtypes.
Its signature is the operator's, tensor for tensor (absent perm / outliers / scale / bias are
zero-size buffers, exactly as the PyTorch op receives them), plus the output `y`:

    codebook_gemm(x [B, in], codes u8 [S, out, row_bytes], codebooks [S, G, K, v], perm i64 [in] | [0],
                  outlier_w [out, n_out] | [0], scale [out] | [0], bias [out] | [0], y f32 [B, out])

Blocks (no dense W is ever formed; codes are unpacked from the bit stream where they are used):

    xq    [B, n_vec*v]         the quantized input columns, permuted and zero-padded to whole vectors
    cbt   [S, G, v, K]         the codebooks in float32, component-major (converted once per call, not per use)
    lut   [B, S, G, n_vec, K]  algo "lut" only: <x_j, codeword k> for every input vector and codeword
    acc   [B, out]             "lut":    Σ_stage Σ_j lut[b, s, g(r), j, code(s, r, j)]
                               "direct": Σ_stage Σ_j Σ_t cbt[s, g(r), t, code(s, r, j)] · xq[b, j*v + t]
    oacc  [B, out]             Σ_o x[b, perm[o]] · outlier_w[r, o]                  (only with outliers)
    y     [B, out]             (acc + oacc) · scale + bias

`choose_algo` picks the LUT-GEMV on CPUs when its table is small and cheaper than the gather-dot, the direct
form otherwise and always on CUDA. Schedules (`SCHEDULES`, keyed by TVM target kind): llvm builds the LUT
with unit-stride vectors over codewords and parallelises output rows over threads; CUDA gives each output
a warp, splits the code loop across its 32 lanes and reduces with shuffles (a 576x1536 layer runs 576 warps,
not 576 threads), with the input permutation and, without outliers, the epilogue fused into that kernel.
Tested against `edgetk.kernels.codebook_gemm.codebook_gemm_reference`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from edgetk.errors import ConfigError, require

TORCH_TO_TVM_DTYPE = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
                      "torch.int64": "int64", "torch.uint8": "uint8"}


@dataclass(frozen=True)
class TirCodebookShape:
    """Everything a codebook_gemm PrimFunc is specialised to (static shapes, as the exporter sees them)."""

    rows: int                 # B: product of the leading dims of x
    in_features: int
    out_features: int
    vec_len: int
    code_bits: int
    stages: int
    groups: int
    codebook_size: int
    row_bytes: int
    n_outliers: int = 0
    has_perm: bool = False
    has_scale: bool = False
    has_bias: bool = False
    x_dtype: str = "float32"
    codebook_dtype: str = "float16"
    outlier_dtype: str = "float16"
    scale_dtype: str = "float16"
    bias_dtype: str = "float16"
    algo: str = "direct"      # "direct" gather-dot, or "lut": LUT-GEMV (see ALGOS)

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown codebook_gemm algorithm {self.algo!r}", hint=f"one of {sorted(ALGOS)}")
        if self.x_dtype != "float32":
            raise ConfigError(f"TIR codebook_gemm takes float32 activations, got {self.x_dtype}",
                              hint="cast the model to float32 before exporting to TVM")
        if self.n_outliers and not self.has_perm:
            raise ConfigError("codebook_gemm with outlier columns needs a perm", hint="re-pack the layer")
        if self.row_bytes * 8 < self.n_vec * self.code_bits:
            raise ConfigError(f"codes hold {self.row_bytes} bytes per row, {self.n_vec} codes of "
                              f"{self.code_bits} bits need {math.ceil(self.n_vec * self.code_bits / 8)}",
                              hint="the codes tensor does not match in_features / vec_len / code_bits")

    @property
    def in_q(self) -> int:
        return self.in_features - self.n_outliers

    @property
    def n_vec(self) -> int:
        return math.ceil(self.in_q / self.vec_len)

    def key(self) -> str:
        """A short, unique, identifier-safe name for this specialisation."""
        flags = "".join(c for c, on in (("p", self.has_perm), ("s", self.has_scale), ("b", self.has_bias)) if on)
        return (f"{self.algo}_b{self.rows}_i{self.in_features}_o{self.out_features}_v{self.vec_len}_c{self.code_bits}"
                f"_s{self.stages}_g{self.groups}_k{self.codebook_size}_n{self.n_outliers}{flags}"
                f"_{self.codebook_dtype}")


def shape_from_tensors(x_shape, codes_shape, codebooks_shape, perm_numel: int, outlier_shape, scale_numel: int,
                       bias_numel: int, in_features: int, vec_len: int, code_bits: int,
                       dtypes: dict[str, str]) -> TirCodebookShape:
    """Build the specialisation from the operator's argument shapes (what the exporter reads off the graph)."""
    rows = math.prod(int(d) for d in x_shape[:-1])
    stages, out_f, row_bytes = (int(d) for d in codes_shape)
    _, groups, k, v = (int(d) for d in codebooks_shape)
    n_out = int(outlier_shape[1]) if len(outlier_shape) == 2 and math.prod(outlier_shape) else 0
    if v != vec_len:
        raise ConfigError(f"codebooks have vectors of {v}, the op says vec_len={vec_len}", hint="re-pack the layer")
    shape = TirCodebookShape(rows=rows, in_features=in_features, out_features=out_f, vec_len=vec_len,
                             code_bits=code_bits, stages=stages, groups=groups, codebook_size=k,
                             row_bytes=row_bytes, n_outliers=n_out, has_perm=perm_numel > 0,
                             has_scale=scale_numel > 0, has_bias=bias_numel > 0, **dtypes)
    shape.validate()
    return shape


def _code_expr(codes, s, r, j, bits: int, row_bytes: int):
    """The j-th `bits`-bit code of row r (little-endian bit stream), as an int32 PrimExpr."""
    from tvm.script import tirx as T

    b = lambda i: T.Cast("int32", codes[s, r, i])  # noqa: E731
    if bits == 8:
        return b(j)
    if bits == 16:
        return b(j * 2) | (b(j * 2 + 1) << 8)
    off = j * bits
    lo = off // 8
    word = b(lo)
    if 8 % bits:  # a code may straddle bytes: read up to three (clamped reads only feed masked-off bits)
        word = word | (b(T.min(lo + 1, row_bytes - 1)) << 8) | (b(T.min(lo + 2, row_bytes - 1)) << 16)
    return (word >> (off % 8)) & ((1 << bits) - 1)


def _dot_expr(xq, cbt, b, s, g, j, c, vec_len: int):
    """<x_j, codeword c> written out over the (static) vector length, so the LUT block stays spatial."""
    acc = xq[b, j * vec_len] * cbt[s, g, 0, c]
    for t in range(1, vec_len):
        acc = acc + xq[b, j * vec_len + t] * cbt[s, g, t, c]
    return acc


def _epilogue_expr(acc, oacc, scale, bias, b, r, has_o: bool, has_s: bool, has_b: bool):
    """(acc + oacc) * scale + bias, with the absent parts left out at parse time."""
    from tvm.script import tirx as T

    v = acc[b, r] + oacc[b, r] if has_o else acc[b, r]
    v = v * T.Cast("float32", scale[r]) if has_s else v
    return v + T.Cast("float32", bias[r]) if has_b else v


def codebook_gemm_primfunc(k: TirCodebookShape):
    """The unscheduled PrimFunc (TVMScript) for one specialisation."""
    require("tvm", "tvm")
    from tvm.script import tirx as T

    k.validate()
    B, IN, OUT, V, NV, S, G, K, RB = (k.rows, k.in_features, k.out_features, k.vec_len, k.n_vec, k.stages,
                                      k.groups, k.codebook_size, k.row_bytes)
    NO, INQ, RPG, BITS = k.n_outliers, k.in_q, k.out_features // k.groups, k.code_bits
    PERM = k.has_perm
    HAS_O, HAS_S, HAS_B = NO > 0, k.has_scale, k.has_bias
    PN = IN if PERM else 0
    OW_SHAPE = (OUT, NO) if HAS_O else (0,)
    SN, BN = (OUT if HAS_S else 0), (OUT if HAS_B else 0)
    XDT, CBDT, ODT, SDT, BDT = k.x_dtype, k.codebook_dtype, k.outlier_dtype, k.scale_dtype, k.bias_dtype
    code, epilogue, dot = _code_expr, _epilogue_expr, _dot_expr
    LUT = k.algo == "lut"
    LUT_SHAPE = (B, S, G, NV, K) if LUT else (1,)

    @T.prim_func(private=True, s_tir=True)
    def codebook_gemm(x: T.Buffer((B, IN), XDT), codes: T.Buffer((S, OUT, RB), "uint8"),
                      cb: T.Buffer((S, G, K, V), CBDT), perm: T.Buffer((PN,), "int64"),
                      ow: T.Buffer(OW_SHAPE, ODT), scale: T.Buffer((SN,), SDT), bias: T.Buffer((BN,), BDT),
                      y: T.Buffer((B, OUT), "float32")):
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        xq = T.sblock_alloc_buffer((B, NV * V), "float32")
        cbt = T.sblock_alloc_buffer((S, G, V, K), "float32")
        lut = T.sblock_alloc_buffer(LUT_SHAPE, "float32")
        acc = T.sblock_alloc_buffer((B, OUT), "float32")
        oacc = T.sblock_alloc_buffer((B, OUT), "float32")
        for b, c in T.grid(B, NV * V):
            with T.sblock("xq"):
                vb, vc = T.axis.remap("SS", [b, c])
                if PERM:
                    xq[vb, vc] = T.if_then_else(vc < INQ, x[vb, perm[T.min(vc + NO, IN - 1)]], T.float32(0))
                else:
                    xq[vb, vc] = T.if_then_else(vc < INQ, x[vb, T.min(vc, IN - 1)], T.float32(0))
        for s, g, t, c in T.grid(S, G, V, K):
            with T.sblock("cbt"):  # codebooks in float32, component-major: converted once per call, not per use
                vs, vg, vt, vc = T.axis.remap("SSSS", [s, g, t, c])
                cbt[vs, vg, vt, vc] = T.Cast("float32", cb[vs, vg, vc, vt])
        if LUT:
            for b, s, g, j, c in T.grid(B, S, G, NV, K):
                with T.sblock("lut"):  # dot products of every input vector with every codeword (spatial in k)
                    vb, vs, vg, vj, vc = T.axis.remap("SSSSS", [b, s, g, j, c])
                    lut[vb, vs, vg, vj, vc] = dot(xq, cbt, vb, vs, vg, vj, vc, V)
            for b, r, s, j in T.grid(B, OUT, S, NV):
                with T.sblock("acc"):  # gather-and-sum over the row's codes
                    vb, vr, vs, vj = T.axis.remap("SSRR", [b, r, s, j])
                    with T.init():
                        acc[vb, vr] = T.float32(0)
                    acc[vb, vr] = acc[vb, vr] + lut[vb, vs, vr // RPG, vj, code(codes, vs, vr, vj, BITS, RB)]
        else:
            for b, r, s, j, t in T.grid(B, OUT, S, NV, V):
                with T.sblock("acc"):
                    vb, vr, vs, vj, vt = T.axis.remap("SSRRR", [b, r, s, j, t])
                    with T.init():
                        acc[vb, vr] = T.float32(0)
                    acc[vb, vr] = acc[vb, vr] + cbt[vs, vr // RPG, vt, code(codes, vs, vr, vj, BITS, RB)] * \
                        xq[vb, vj * V + vt]
        if HAS_O:
            for b, r, o in T.grid(B, OUT, NO):
                with T.sblock("oacc"):
                    vb, vr, vo = T.axis.remap("SSR", [b, r, o])
                    with T.init():
                        oacc[vb, vr] = T.float32(0)
                    oacc[vb, vr] = oacc[vb, vr] + x[vb, perm[vo]] * T.Cast("float32", ow[vr, vo])
        for b, r in T.grid(B, OUT):
            with T.sblock("y"):
                vb, vr = T.axis.remap("SS", [b, r])
                y[vb, vr] = epilogue(acc, oacc, scale, bias, vb, vr, HAS_O, HAS_S, HAS_B)

    return codebook_gemm


# -- schedules ----------------------------------------------------------------------------------
def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - tvm raises a generic schedule error for a missing block
        return False


def schedule_llvm(func, k: TirCodebookShape):
    """CPU: LUT built with unit-stride vectors over codewords (parallel over input vectors); the row loop of the
    gather-and-sum (or of the direct gather-dot) parallel over threads in tiles of 16 rows."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if k.algo == "lut":
        b, s, g, j, c = sch.get_loops(sch.get_sblock("lut"))
        sch.parallel(sch.fuse(b, s, g, j))
        vec = next((w for w in (16, 8, 4) if k.codebook_size % w == 0), None)
        if vec:
            _, ci = sch.split(c, [None, vec])
            sch.vectorize(ci)
        b, r, s, j = sch.get_loops(sch.get_sblock("acc"))
        sch.reorder(r, b, s, j)
    else:
        b, r, s, j, t = sch.get_loops(sch.get_sblock("acc"))
        sch.reorder(r, b, s, j, t)
        sch.unroll(t)
    r = sch.get_loops(sch.get_sblock("acc"))[0]
    ro, _ = sch.split(r, [None, min(16, k.out_features)])
    sch.parallel(ro)
    if _has_block(sch, "oacc"):
        ob, orr, _ = sch.get_loops(sch.get_sblock("oacc"))
        sch.reorder(orr, ob)
        sch.parallel(orr)
    yb, yr = sch.get_loops(sch.get_sblock("y"))
    sch.parallel(sch.fuse(yb, yr))
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def schedule_cuda(func, k: TirCodebookShape, rows_per_block: int = 4):
    """CUDA: a warp per output (b, r); its 32 lanes split the code loop and reduce with shuffles; the
    input permutation/padding is inlined into the reduction and the epilogue runs in the same kernel."""
    from tvm import s_tir

    if k.algo != "direct":
        raise ConfigError(f"the CUDA schedule takes the direct algorithm, not {k.algo!r}",
                          hint="use choose_algo(k, 'cuda')")
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("xq"))
    sch.compute_inline(sch.get_sblock("cbt"))
    acc = sch.get_sblock("acc")
    b, r, s, j, t = sch.get_loops(acc)
    rpb = max(1, min(rows_per_block, k.rows * k.out_features))
    bro, bri = sch.split(sch.fuse(b, r), [None, rpb])
    jo, ji = sch.split(j, [None, 32])
    sch.reorder(bro, bri, ji, s, jo, t)
    sch.bind(bro, "blockIdx.x")
    sch.bind(bri, "threadIdx.y")
    sch.bind(ji, "threadIdx.x")
    sch.unroll(t)
    if not _has_block(sch, "oacc"):  # the epilogue joins the reduction kernel (lane 0 writes y)
        sch.reverse_compute_at(sch.get_sblock("y"), bri)
        sch.set_scope(acc, 0, "local")
        return sch.mod["main"].with_attr("tir.is_scheduled", True)
    for name in ("oacc", "y"):  # with outlier columns: two more small kernels, a thread per output
        loops = sch.get_loops(sch.get_sblock(name))
        bx, tx = sch.split(sch.fuse(*loops[:2]), [None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


SCHEDULES: dict[str, Callable] = {"llvm": schedule_llvm, "cuda": schedule_cuda}
ALGOS = {"direct": "y[b, r] = Σ codebook[code(r, j)] · x_j (a gather-dot per output; CUDA, and CPU when the LUT "
                   "would not pay off)",
         "lut": "LUT-GEMV: LUT[j, k] = <x_j, codeword k> once per call, then y[b, r] = Σ_j LUT[j, code(r, j)] (CPU)"}
LUT_MAX_BYTES = 8 << 20


def choose_algo(k: TirCodebookShape, target_kind: str) -> str:
    """LUT-GEMV on CPUs when its table is small and building it (vectorised, ~8 MACs per instruction) plus the
    gathers costs less than the direct gather-dot; the direct form everywhere else."""
    if target_kind != "llvm":
        return "direct"
    table = k.rows * k.stages * k.groups * k.n_vec * k.codebook_size
    lut_cost = table * k.vec_len / 8 + k.rows * k.stages * k.out_features * k.n_vec
    direct_cost = k.rows * k.stages * k.out_features * k.n_vec * k.vec_len
    return "lut" if table * 4 <= LUT_MAX_BYTES and lut_cost < direct_cost else "direct"


def scheduled_primfunc(k: TirCodebookShape, target_kind: str, algo: str | None = None):
    """The PrimFunc for `k` with the schedule of TVM target kind `target_kind` ("llvm" or "cuda"); the algorithm
    is `algo` if given, else chosen per target (`choose_algo`)."""
    if target_kind not in SCHEDULES:
        raise ConfigError(f"no TIR codebook_gemm schedule for TVM target kind {target_kind!r}",
                          hint=f"targets with a schedule: {sorted(SCHEDULES)}")
    k = dataclasses.replace(k, algo=algo or choose_algo(k, target_kind))
    return SCHEDULES[target_kind](codebook_gemm_primfunc(k), k)


def build(k: TirCodebookShape, target, algo: str | None = None):
    """Compile the standalone kernel (tests, benchmarks): a runtime module with function `codebook_gemm`."""
    tvm = require("tvm", "tvm")
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    func = scheduled_primfunc(k, target.kind.name, algo).with_attr("global_symbol", "codebook_gemm")
    return tvm.compile(tvm.IRModule({"codebook_gemm": func}), target=target)
