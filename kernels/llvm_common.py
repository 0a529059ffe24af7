"""Shared llvmlite plumbing for the generated CPU kernels (kernels/llvm_*.py).

* `target_machine(triple)`: the host (CPU name + features, so AVX2/AVX-512 on x86, NEON on aarch64) or a
  cross triple (aarch64-linux-gnu: NEON is baseline) as an LLVM TargetMachine.
* `Gen`: a tiny IR-building kit over `llvmlite.ir` (i64 counted loops, entry-block allocas, typed loads
  of the `i64 args[]` block every kernel receives, `llvm.masked.gather`).
* `add_parallel_for(module, work)`: emits `<work>_par(args, n_items, n_threads)` which splits
  [0, n_items) into `n_threads` contiguous ranges and calls `work(args, tid, begin, end)` for each (no Python
  thread, no GIL). For the host JIT, when PyTorch's OpenMP runtime (libgomp) is in the process, the ranges run
  on its thread team through `GOMP_parallel`: those threads already exist (and spin after every PyTorch op),
  so a call costs microseconds instead of a pthread_create per range (~40 us) and never competes with
  them for a core. Otherwise (cross targets: the aarch64 check program) range 0 runs on the calling thread
  and the others on pthreads created and joined inside the generated code.
* `jit(module)` compiles at -O3 for the host and returns function addresses; `emit_object(module, triple)`
  writes a relocatable object for a cross target (used by kernels/aarch64_check).

llvmlite 0.50 (LLVM 22): `llvm.initialize()` raises; targets and asm printers are initialised explicitly and
the new pass manager is used.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from typing import Iterator

from edgetk.errors import MissingDependencyError

try:
    import llvmlite.binding as llvm
    import llvmlite.ir as ir
except ImportError as exc:  # llvmlite is a core dependency; a broken install lands here
    raise MissingDependencyError(f"llvmlite is not importable ({exc})", hint="pip install 'llvmlite>=0.43'") from exc

I1, I8, I16, I32, I64, F32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
PTR = ir.PointerType()
VOID = ir.VoidType()
_LOCK = threading.Lock()


def gomp_available() -> bool:
    """libgomp's entry points are visible in this process (PyTorch's CPU builds load it), registered for the JIT."""
    return _init()


@functools.cache
def _init() -> bool:
    """Targets, asm printers and the JIT's external symbols (pthreads; libgomp's, when present: returns whether)."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    llvm.initialize_native_asmparser()
    gomp = False
    try:
        import torch  # noqa: F401  (loads its OpenMP runtime)

        proc = ctypes.CDLL(None)
        for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"):
            llvm.add_symbol(name, ctypes.cast(getattr(proc, name), ctypes.c_void_p).value)
        gomp = True
    except (ImportError, AttributeError, OSError):  # another OpenMP runtime or none: pthreads serve
        pass
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for name in ("pthread_create", "pthread_join"):
        try:
            fn = getattr(libc, name)
        except AttributeError:  # glibc < 2.34 keeps pthread in libpthread
            fn = getattr(ctypes.CDLL(ctypes.util.find_library("pthread")), name)
        llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
    return gomp


@functools.cache
def target_machine(triple: str | None = None, cpu: str | None = None):
    """TargetMachine for `triple` (None = this host with its CPU features); `cpu` names another CPU of the
    triple (e.g. "sapphirerapids": to check the AVX-512 code a host without AVX-512 cannot run)."""
    _init()
    if triple is None and cpu is None:
        triple = llvm.get_process_triple()
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    else:
        triple = triple or llvm.get_process_triple()
        features = "+neon" if triple.startswith("aarch64") and cpu is None else ""
        cpu = cpu or "generic"
    target = llvm.Target.from_triple(triple)
    return target.create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default",
                                        jit=triple == llvm.get_process_triple())


@functools.cache
def host_vector_bits() -> int:
    _init()
    feats = llvm.get_host_cpu_features()
    if feats.get("avx512f"):
        return 512
    if feats.get("avx2") or feats.get("avx"):
        return 256
    return 128


def new_module(name: str, triple: str | None = None):
    tm = target_machine(triple)
    mod = ir.Module(name=name)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    return mod


def _optimize(mod_ref, tm) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod_ref, pb)


def compile_ir(mod, triple: str | None = None, cpu: str | None = None):
    tm = target_machine(triple, cpu)
    ref = llvm.parse_assembly(str(mod))
    ref.verify()
    _optimize(ref, tm)
    return ref, tm


_ENGINES: list = []  # keep every JIT engine (and its code) alive for the process lifetime


def jit(mod, names: list[str]) -> dict[str, int]:
    """Compile `mod` for this host and return {function name: address}."""
    with _LOCK:
        ref, tm = compile_ir(mod)
        engine = llvm.create_mcjit_compiler(ref, tm)
        engine.finalize_object()
        engine.run_static_constructors()
        _ENGINES.append((engine, ref))
        return {n: engine.get_function_address(n) for n in names}


def emit_object(mod, triple: str, cpu: str | None = None) -> bytes:
    ref, tm = compile_ir(mod, triple, cpu)
    return tm.emit_object(ref)


def emit_assembly(mod, triple: str | None = None, cpu: str | None = None) -> str:
    ref, tm = compile_ir(mod, triple, cpu)
    return tm.emit_assembly(ref)


class Gen:
    """IRBuilder helpers used by the kernel generators."""

    def __init__(self, fn):
        self.fn = fn
        self.entry = fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)

    def i64(self, v: int):
        return ir.Constant(I64, v)

    def var(self, ty, init=None, name=""):
        """An entry-block alloca (promoted to a register by mem2reg)."""
        with self.b.goto_block(self.entry):
            self.b.position_at_start(self.entry)
            slot = self.b.alloca(ty, name=name)
        if init is not None:
            self.b.store(init, slot)
        return slot

    def arg(self, args, i: int, ty=PTR):
        """Field i of the `i64 args[]` block as a pointer (ty=PTR) or an i64."""
        v = self.b.load(self.b.gep(args, [self.i64(i)], source_etype=I64), typ=I64)
        return self.b.inttoptr(v, PTR) if ty is PTR else v

    def load(self, ty, base, idx):
        return self.b.load(self.b.gep(base, [idx], source_etype=ty), typ=ty)

    def store(self, ty, val, base, idx) -> None:
        self.b.store(val, self.b.gep(base, [idx], source_etype=ty))

    def load_or(self, ty, base, idx, default, cond=None):
        """base[idx] when `cond` (an i1; default: base is not null), else `default` (a constant of ty). The load
        sits under a branch: a `select` of it would still read base -- LLVM keeps such a load unconditional on
        AVX-512 hosts with a masked move after it (a null `bias` crashed the float32 GEMV on a Zen 5)."""
        b = self.b
        if cond is None:
            cond = b.icmp_unsigned("!=", b.ptrtoint(base, I64), self.i64(0))
        slot = self.var(ty, default)
        with b.if_then(cond):
            b.store(self.load(ty, base, idx), slot)
        return b.load(slot, typ=ty)

    @contextlib.contextmanager
    def loop(self, start, stop, step=1, name="i") -> Iterator:
        """for (i = start; i < stop; i += step) over i64 (signed compare; step an int or a positive i64 value)."""
        b = self.b
        start = self.i64(start) if isinstance(start, int) else start
        stop = self.i64(stop) if isinstance(stop, int) else stop
        pre = b.block
        cond = b.append_basic_block(f"{name}.cond")
        body = b.append_basic_block(f"{name}.body")
        end = b.append_basic_block(f"{name}.end")
        b.branch(cond)
        b.position_at_end(cond)
        i = b.phi(I64, name=name)
        i.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", i, stop), body, end)
        b.position_at_end(body)
        yield i
        nxt = b.add(i, self.i64(step) if isinstance(step, int) else step)
        i.add_incoming(nxt, b.block)
        b.branch(cond)
        b.position_at_end(end)

    def min(self, a, c):
        return self.b.select(self.b.icmp_signed("<", a, c), a, c)

    def max(self, a, c):
        return self.b.select(self.b.icmp_signed(">", a, c), a, c)

    def fmax(self, a, c):
        """Lane-wise max of two float vectors (x86: one vmaxps)."""
        return self.b.select(self.b.fcmp_ordered(">", a, c), a, c)

    def hmax(self, v):
        """The largest lane of a float vector (a power-of-two width) as a scalar."""
        n = v.type.count
        while n > 1:
            n //= 2
            hi = self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, v.type.count),
                                                         list(range(n, 2 * n)) + list(range(n, v.type.count))))
            v = self.fmax(hi, v)
        return self.b.extract_element(v, ir.Constant(I32, 0))

    def reduce_add(self, v):
        """The sum of a float vector's lanes as a scalar (llvm.vector.reduce.fadd, reassociated: a shuffle tree)."""
        m = self.fn.module
        name = f"llvm.vector.reduce.fadd.v{v.type.count}f32"
        fn = m.globals.get(name) or ir.Function(m, ir.FunctionType(F32, [F32, v.type]), name)
        return self.b.call(fn, [ir.Constant(F32, -0.0), v], fastmath=("reassoc", "nsz"))

    def splat(self, val, n: int):
        vt = ir.VectorType(val.type, n)
        v = self.b.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(I32, n), [0] * n))

    def gather(self, base, idx_vec, n: int):
        """<n x float> = base[idx_vec[i]] via llvm.masked.gather (vpgatherdd on AVX2/AVX-512)."""
        m = self.fn.module
        vt = ir.VectorType(F32, n)
        name = f"llvm.masked.gather.v{n}f32.v{n}p0"
        fn = m.globals.get(name) or ir.Function(
            m, ir.FunctionType(vt, [ir.VectorType(PTR, n), I32, ir.VectorType(ir.IntType(1), n), vt]), name)
        ptrs = self.b.gep(base, [idx_vec], source_etype=F32)
        ptrs.type = ir.VectorType(PTR, n)  # llvmlite types a vector-index GEP as a scalar ptr
        mask = ir.Constant(ir.VectorType(ir.IntType(1), n), [1] * n)
        return self.b.call(fn, [ptrs, ir.Constant(I32, 4), mask, ir.Constant(vt, ir.Undefined)])

    def fma(self, a, c, d):
        """a * c + d (llvm.fma on a float or a float vector)."""
        t = a.type
        name = f"llvm.fma.v{t.count}f32" if isinstance(t, ir.VectorType) else "llvm.fma.f32"
        m = self.fn.module
        fn = m.globals.get(name) or ir.Function(m, ir.FunctionType(t, [t, t, t]), name)
        return self.b.call(fn, [a, c, d])


WORK_TYPE = ir.FunctionType(VOID, [PTR, I64, I64, I64])  # (args, tid, begin, end)


def add_parallel_for(mod, work) -> ir.Function:
    """Emit `<work>_par(args, n_items, n_threads)`: contiguous ranges of [0, n_items), one per thread (see the
    module docstring for the two runtimes)."""
    if mod.triple == llvm.get_process_triple() and gomp_available():
        return _add_gomp_parallel_for(mod, work)
    return _add_pthread_parallel_for(mod, work)


def _ranges(g: "Gen", n_items, n_thr, t):
    """[lo, hi) of range t when [0, n_items) is cut into n_thr contiguous ranges."""
    b = g.b
    chunk = b.sdiv(b.add(n_items, b.sub(n_thr, g.i64(1))), n_thr)
    lo = g.min(b.mul(t, chunk), n_items)
    return lo, g.min(b.add(lo, chunk), n_items)


def _add_gomp_parallel_for(mod, work) -> ir.Function:
    """Ranges on libgomp's team: GOMP_parallel(fn, data, n, 0); team member m of a team of size M runs ranges
    m, m + M, ... (a smaller team than asked for still covers every range; range t uses scratch slot t)."""
    def decl(name, ty):
        return mod.globals.get(name) or ir.Function(mod, ty, name)

    gomp = decl("GOMP_parallel", ir.FunctionType(VOID, [PTR, PTR, I32, I32]))
    tnum = decl("omp_get_thread_num", ir.FunctionType(I32, []))
    tcount = decl("omp_get_num_threads", ir.FunctionType(I32, []))
    body = ir.Function(mod, ir.FunctionType(VOID, [PTR]), f"{work.name}_omp")
    body.linkage = "internal"
    g = Gen(body)
    b = g.b
    data = body.args[0]
    args, n_items, n_thr = (g.load(I64, data, g.i64(k)) for k in range(3))
    me, team = b.sext(b.call(tnum, []), I64), b.sext(b.call(tcount, []), I64)
    with g.loop(me, n_thr, step=team, name="r") as t:
        lo, hi = _ranges(g, n_items, n_thr, t)
        with b.if_then(b.icmp_signed("<", lo, hi)):
            b.call(work, [b.inttoptr(args, PTR), t, lo, hi])
    b.ret_void()

    par = ir.Function(mod, ir.FunctionType(VOID, [PTR, I64, I64]), f"{work.name}_par")
    g = Gen(par)
    b = g.b
    args, n_items, n_thr = par.args
    n_thr = g.max(g.min(n_thr, n_items), g.i64(1))
    one = b.icmp_signed("==", n_thr, g.i64(1))
    with b.if_else(one) as (then, other):
        with then:
            b.call(work, [args, g.i64(0), g.i64(0), n_items])
        with other:
            slot = b.alloca(I64, size=g.i64(3))
            for k, v in enumerate([b.ptrtoint(args, I64), n_items, n_thr]):
                g.store(I64, v, slot, g.i64(k))
            b.call(gomp, [body, slot, b.trunc(n_thr, I32), ir.Constant(I32, 0)])
    b.ret_void()
    return par


def _add_pthread_parallel_for(mod, work) -> ir.Function:
    """pthreads over the ranges: range 0 on the calling thread, the others on threads created and joined here."""
    pthread_t = I64  # pthread_t is unsigned long on Linux x86_64 and aarch64
    create = mod.globals.get("pthread_create") or ir.Function(
        mod, ir.FunctionType(I32, [PTR, PTR, PTR, PTR]), "pthread_create")
    join = mod.globals.get("pthread_join") or ir.Function(mod, ir.FunctionType(I32, [pthread_t, PTR]),
                                                          "pthread_join")
    # a slot is i64[4]: args (as an integer), tid, begin, end
    tramp = ir.Function(mod, ir.FunctionType(PTR, [PTR]), f"{work.name}_tramp")
    tramp.linkage = "internal"
    g = Gen(tramp)
    s = tramp.args[0]
    f = [g.load(I64, s, g.i64(k)) for k in range(4)]
    g.b.call(work, [g.b.inttoptr(f[0], PTR), *f[1:]])
    g.b.ret(ir.Constant(PTR, None))

    par = ir.Function(mod, ir.FunctionType(VOID, [PTR, I64, I64]), f"{work.name}_par")
    g = Gen(par)
    args, n_items, n_thr = par.args
    b = g.b
    n_thr = g.max(g.min(n_thr, n_items), g.i64(1))
    slots = b.alloca(I64, size=b.mul(n_thr, g.i64(4)))
    tids = b.alloca(pthread_t, size=n_thr)
    with g.loop(0, n_thr, name="t") as t:
        lo, hi = _ranges(g, n_items, n_thr, t)
        for k, v in enumerate([b.ptrtoint(args, I64), t, lo, hi]):
            g.store(I64, v, slots, b.add(b.mul(t, g.i64(4)), g.i64(k)))
    with g.loop(1, n_thr, name="spawn") as t:
        tid_p = b.gep(tids, [t], source_etype=pthread_t)
        slot_p = b.gep(slots, [b.mul(t, g.i64(4))], source_etype=I64)
        rc = b.call(create, [tid_p, ir.Constant(PTR, None), tramp, slot_p])
        with b.if_then(b.icmp_signed("!=", rc, ir.Constant(I32, 0))):  # no thread: run that range here
            b.call(tramp, [slot_p])
            b.store(g.i64(-1), tid_p)
    b.call(tramp, [slots])
    with g.loop(1, n_thr, name="join") as t:
        tid = g.load(pthread_t, tids, t)
        with b.if_then(b.icmp_signed("!=", tid, g.i64(-1))):
            b.call(join, [tid, ir.Constant(PTR, None)])
    b.ret_void()
    return par


_SCRATCH = threading.local()


def scratch(nbytes: int):
    """A per-thread uint8 work buffer of at least `nbytes` (grown, never shrunk) for the generated kernels."""
    import torch

    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _SCRATCH.buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf
