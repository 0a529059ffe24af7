"""Cross-check of the llvmlite codebook kernels on aarch64 (NEON) under qemu-user.

The same generators as the host JIT (`edgetk.kernels.llvm_codebook.build_module`, and the NEON `tbl` int8-LUT gemv of
`edgetk.kernels.llvm_codebook_q8.build_module`, the int8 prefill GEMM of `edgetk.kernels.llvm_gemm_i8` with `sdot` or
plain NEON, the few-input GEMM of `edgetk.kernels.llvm_codebook_few`) emit an aarch64 ELF object;
`codebook_check.c` (this folder) is linked against it with `aarch64-linux-gnu-gcc` and run with
`qemu-aarch64 -L /usr/aarch64-linux-gnu`. Each case ships the kernel's argument block and one blob holding every
input (repacked codes, float32 codebooks, x, scratch): pointer arguments are blob offsets that the C program
rebases. The output region comes back and is compared with `codebook_gemm_reference` by the caller.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetk.errors import DeviceError
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_q8 as q8
from edgetk.kernels import llvm_common as lc

TRIPLE = "aarch64-unknown-linux-gnu"
CC = "aarch64-linux-gnu-gcc"
SYSROOT = "/usr/aarch64-linux-gnu"
SOURCE = Path(__file__).with_name("codebook_check.c")
NEON_BITS = 128
MAGIC = 0x4B43454843424345
PTR_ARGS = (lk.A_X, lk.A_PERM, lk.A_CODES, lk.A_CBT, lk.A_OW, lk.A_SCALE, lk.A_BIAS, lk.A_Y, lk.A_SCR)


def tools_available() -> bool:
    return shutil.which(CC) is not None and shutil.which("qemu-aarch64") is not None


def build(spec: lk.KernelSpec, workdir: Path, kernel: str = "f32") -> Path:
    """Emit the aarch64 object for `spec` (kernel "f32": gemv + gemm; "q8": the NEON int8-LUT gemv, its LUT built
    with `sdot` for a dot-product core when `spec.int_lut`), link the check program, return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    obj = workdir / "codebook_kernels.o"
    mod = q8.build_module(spec, "neon", TRIPLE) if kernel == "q8" else lk.build_module(spec, TRIPLE)
    obj.write_bytes(lc.emit_object(mod, TRIPLE, I8_CPU["dot"] if kernel == "q8" and spec.int_lut else None))
    return _link(obj, workdir)


@dataclass
class _Blob:
    parts: list
    size: int = 0

    def add(self, t: torch.Tensor | None, nbytes: int | None = None) -> int:
        if t is None and nbytes is None:
            return -1
        off = self.size
        data = bytes(nbytes) if t is None else t.contiguous().view(torch.uint8).numpy().tobytes()
        self.parts.append(data + bytes(-len(data) % 64))
        self.size += len(self.parts[-1])
        return off


def write_case(path: Path, p: lk.Packed, x2: torch.Tensor, n_threads: int,
               kernel: str = "f32") -> tuple[int, torch.Tensor | None]:
    """Serialise one call (gemv when x2 has one row, else gemm, split by batch tiles or rows as
    `llvm_codebook.gemm` chooses; kernel "q8": the int8-LUT gemv; "f32k": the float32 gemv split over code columns,
    `gemvk`); returns (output floats, permuted x for gemm)."""
    blob, a = _Blob([]), p.static_args()
    gemv = x2.shape[0] == 1
    xp = None
    fn = {"q8": 2, "f32k": 7}.get(kernel, 0 if gemv else 1)
    n_items = p.n_rb
    if gemv:
        if kernel == "q8":
            stride = q8.stride(p, n_threads)
        else:
            stride = lk.gemvk_stride(p) if kernel == "f32k" else lk.gemv_stride(p)
        a[lk.A_X], out_n = blob.add(x2[0]), p.n_rb * p.spec.R
    else:
        xp, xt = lk.gemm_inputs(p, x2)
        a[lk.A_X], stride, a[lk.A_NBT] = blob.add(xt), lk.gemm_stride(p), xt.shape[0]
        out_n = xt.shape[0] * p.n_rb * p.spec.R * p.spec.BT
        if lk.split_batch(xt.shape[0], n_threads):  # as `llvm_codebook.gemm`
            fn, n_items = 3, xt.shape[0]
    a[lk.A_PERM], a[lk.A_CODES], a[lk.A_CBT] = blob.add(p.perm), blob.add(p.codes_r), blob.add(p.cbt)
    a[lk.A_OW], a[lk.A_SCALE], a[lk.A_BIAS] = blob.add(p.ow), blob.add(p.scale), blob.add(p.bias)
    a[lk.A_Y], a[lk.A_SCR], a[lk.A_SSTRIDE] = blob.add(None, 4 * out_n), blob.add(None, stride * n_threads), stride
    mask = sum(1 << i for i in PTR_ARGS)
    head = [MAGIC, fn, n_items, n_threads, a[lk.A_Y], 4 * out_n, mask, lk.N_ARGS, *a, blob.size]
    path.write_bytes(struct.pack(f"<{len(head)}q", *head) + b"".join(blob.parts))
    return out_n, xp


def run(exe: Path, p: lk.Packed, x2: torch.Tensor, n_threads: int, workdir: Path, kernel: str = "f32") -> torch.Tensor:
    """y [B, out] computed by the aarch64 kernel under qemu."""
    case = workdir / "case.bin"
    out_n, xp = write_case(case, p, x2, n_threads, kernel)
    y = torch.frombuffer(bytearray(_exec(exe, case, workdir / "out.bin")), dtype=torch.float32)
    assert y.numel() == out_n
    if xp is None:
        return y[:p.out_f][None].clone()
    return lk.gemm_finish(p, y.view(-1, p.n_rb * p.spec.R, p.spec.BT), xp)


I8_CPU = {"dot": "cortex-a76", "generic": None}  # a dot-product core (ARMv8.2: Orin, Pi 5) / any NEON core (Pi 4)


def build_i8(isa: str, vec_len: int, workdir: Path) -> Path:
    """The int8 prefill GEMM (llvm_gemm_i8, `isa` "dot": `sdot`, or "generic") as an aarch64 check program."""
    from edgetk.kernels import llvm_gemm_i8 as i8

    workdir.mkdir(parents=True, exist_ok=True)
    obj = workdir / "gemm_i8.o"
    obj.write_bytes(lc.emit_object(i8.build_module(isa, vec_len, TRIPLE), TRIPLE, I8_CPU[isa]))
    return _link(obj, workdir)


def build_few(spec: lk.KernelSpec, P: int, TT: int, workdir: Path, panel: bool = False) -> Path:
    """The few-input GEMM (llvm_codebook_few, P codes per NEON vector, tiles of TT inputs; panel: its panel GEMM) as
    a check program."""
    from edgetk.kernels import llvm_codebook_few as few

    workdir.mkdir(parents=True, exist_ok=True)
    obj = workdir / "codebook_few.o"
    obj.write_bytes(lc.emit_object(few.build_module(spec, P, TT, TRIPLE, panel=panel), TRIPLE))
    return _link(obj, workdir)


def run_few(exe: Path, p: lk.Packed, x2: torch.Tensor, n_threads: int, workdir: Path, TT: int,
            panel: bool = False) -> torch.Tensor:
    """y [B, out] from the aarch64 few-input GEMM under qemu (inputs padded to whole tiles of TT, as
    `llvm_codebook_few.gemm` does; no outliers: those are added in torch; panel: a program from
    `build_few(panel=True)`, given each thread's scratch for its decoded row tile)."""
    from edgetk.kernels import llvm_codebook_few as few

    B = x2.shape[0]
    _, xq, n_tiles = few.pack_inputs(p, x2, TT)
    blob, a = _Blob([]), p.static_args()
    a[lk.A_X], a[lk.A_CBT], a[lk.A_NBT], a[lk.A_ROWS] = blob.add(xq), blob.add(few._cbk(p)), n_tiles, B
    a[lk.A_PERM], a[lk.A_CODES], a[lk.A_OW], a[lk.A_SCR] = -1, blob.add(p.codes_r), -1, -1
    if panel:
        a[lk.A_SSTRIDE] = few.panel_stride(p)
        a[lk.A_SCR] = blob.add(None, a[lk.A_SSTRIDE] * n_threads)
    a[lk.A_SCALE], a[lk.A_BIAS] = blob.add(p.scale), blob.add(p.bias)
    out_n = n_tiles * TT * p.out_f
    a[lk.A_Y] = blob.add(None, 4 * out_n)
    head = [MAGIC, 6, p.n_rb, n_threads, a[lk.A_Y], 4 * out_n, sum(1 << i for i in PTR_ARGS), lk.N_ARGS, *a,
            blob.size]
    y = torch.frombuffer(bytearray(_qemu(exe, workdir, head, blob)), dtype=torch.float32)
    return y.view(-1, p.out_f)[:B].clone()


def _link(obj: Path, workdir: Path) -> Path:
    exe = workdir / "codebook_check"
    res = subprocess.run([CC, "-O2", "-o", str(exe), str(SOURCE), str(obj), "-lpthread", "-lm"],
                         capture_output=True, text=True)
    if res.returncode:
        raise DeviceError(f"linking the aarch64 check failed: {res.stderr.strip()[:500]}",
                          hint="apt-get install gcc-aarch64-linux-gnu")
    return exe


def _qemu(exe: Path, workdir: Path, head: list, blob: _Blob) -> bytes:
    case = workdir / "case.bin"
    case.write_bytes(struct.pack(f"<{len(head)}q", *head) + b"".join(blob.parts))
    return _exec(exe, case, workdir / "out.bin")


def _exec(exe: Path, case: Path, out: Path) -> bytes:
    """Run the check program on one case file under qemu; the output region's bytes."""
    res = subprocess.run(["qemu-aarch64", "-L", SYSROOT, str(exe), str(case), str(out)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise DeviceError(f"aarch64 check program failed ({res.returncode}): {res.stderr.strip()[:500]}",
                          hint="apt-get install qemu-user; it runs as qemu-aarch64 -L " + SYSROOT)
    return out.read_bytes()


def instructions_per_call(exe: Path, p: lk.Packed, x2: torch.Tensor, n_threads: int, workdir: Path,
                          kernel: str = "f32") -> int:
    """Guest instructions one call of the kernel executes under qemu (`-singlestep -d exec,nochain`: one logged
    block per instruction), as the difference between the program run with two calls and with one: the setup,
    the first call's cold effects and the output write cancel. A proxy for time where no ARM core is at hand
    (instructions differ in cost, and memory is not modelled)."""
    case = workdir / "case.bin"
    write_case(case, p, x2, n_threads, kernel)
    n = [_count(exe, case, workdir / "out.bin", calls) for calls in (1, 2)]
    return n[1] - n[0]


def _count(exe: Path, case: Path, out: Path, calls: int) -> int:
    cmd = ["qemu-aarch64", "-singlestep", "-d", "exec,nochain", "-D", "/dev/stderr", "-L", SYSROOT, str(exe),
           str(case), str(out), str(calls)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n, tail = 0, b""
    for line in proc.stderr:
        if line.startswith(b"Trace "):
            n += 1
        else:
            tail = (tail + line)[-500:]
    if proc.wait():
        msg = tail.decode(errors="replace").strip()
        raise DeviceError(f"aarch64 check program failed under qemu ({proc.returncode}): {msg}",
                          hint="apt-get install qemu-user; it runs as qemu-aarch64 -L " + SYSROOT)
    return n


def run_i8(exe: Path, p, x2: torch.Tensor, n_threads: int, workdir: Path):
    """(y [T, out], (activation bytes, scales)) from the aarch64 int8 prefill GEMM under qemu: first its activation
    quantization (i8q_work_par), then the row blocks (i8_work_par) on those activations -- both run on aarch64."""
    from edgetk.kernels import llvm_codebook as lk
    from edgetk.kernels import llvm_gemm_i8 as i8

    q = p.base
    xp, xc = i8._inputs(p, x2)
    T, kp = xc.shape
    ng = kp // i8.GS
    a = [-1] * i8.N_ARGS
    ptrs = (i8.I_X, i8.I_XQ, i8.I_SX, i8.I_IDX, i8.I_CBW, i8.I_SW, i8.I_Y, i8.I_SCR)
    mask = sum(1 << i for i in ptrs)
    blob = _Blob([])
    a[i8.I_X], a[i8.I_T], a[i8.I_KP] = blob.add(xc), T, kp
    a[i8.I_XQ] = blob.add(None, T * kp + 4 * T * ng)
    a[i8.I_SX] = a[i8.I_XQ] + T * kp  # T * kp is a multiple of 64: one output region for both
    head = [MAGIC, 4, T, n_threads, a[i8.I_XQ], T * kp + 4 * T * ng, mask, i8.N_ARGS, *a, blob.size]
    raw = _qemu(exe, workdir, head, blob)
    xu = torch.frombuffer(bytearray(raw[:T * kp]), dtype=torch.uint8).view(T, kp)
    sx = torch.frombuffer(bytearray(raw[T * kp:]), dtype=torch.float32).view(T, ng)

    blob, out_pad, stride = _Blob([]), p.n_rb * i8.RB, i8.scratch_stride(kp)
    a[i8.I_X], a[i8.I_XQ], a[i8.I_SX] = -1, blob.add(xu), blob.add(sx)
    a[i8.I_IDX], a[i8.I_CBW], a[i8.I_SW] = blob.add(p.idx), blob.add(p.cbw), blob.add(p.sw)
    a[i8.I_Y], a[i8.I_SCR] = blob.add(None, 4 * T * out_pad), blob.add(None, stride * n_threads)
    a[i8.I_SSTRIDE] = stride
    a[i8.I_NVEC], a[i8.I_RPG], a[i8.I_K], a[i8.I_OUT] = q.n_vec, q.out_f // q.groups, p.cbw.shape[1], q.out_f
    a[i8.I_OSTRIDE] = out_pad
    head = [MAGIC, 5, p.n_rb, n_threads, a[i8.I_Y], 4 * T * out_pad, mask, i8.N_ARGS, *a, blob.size]
    y = torch.frombuffer(bytearray(_qemu(exe, workdir, head, blob)), dtype=torch.float32).view(T, out_pad)
    return lk.finish(q, y[:, :q.out_f], xp), (xu, sx)
