"""Small real models for the export tests (importable as tests.export.helpers_export or by path)."""
from __future__ import annotations

import torch
from torch import nn

from edgetk.kernels.codebook_gemm import pack_codes


class SmallCNN(nn.Module):
    """conv + batch norm + depthwise conv + pooling + linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pool(torch.relu(self.bn2(self.pw(self.dw(x)))))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics so batch norm matters
        for bn in (m.bn, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


class CodebookLinear(nn.Module):
    """A linear layer stored as VQ codes, calling torch.ops.edgetk.codebook_gemm (stand-in for VQLinear)."""

    def __init__(self, out_f=32, in_f=48, vec_len=4, bits=2, stages=1, groups=1, n_outliers=0, scale=True,
                 bias=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        k = 2 ** bits
        in_q = in_f - n_outliers
        n_vec = -(-in_q // vec_len)
        self.meta = (in_f, vec_len, bits)
        self.register_buffer("codes", pack_codes(torch.randint(0, k, (stages, out_f, n_vec), generator=g), bits))
        self.register_buffer("codebooks", torch.randn(stages, groups, k, vec_len, generator=g).half())
        self.register_buffer("perm", torch.randperm(in_f, generator=g) if n_outliers else
                             torch.empty(0, dtype=torch.long))
        self.register_buffer("outlier_w", torch.randn(out_f, n_outliers, generator=g).half() if n_outliers
                             else torch.empty(0))
        self.register_buffer("scale", torch.rand(out_f, generator=g) + 0.5 if scale else torch.empty(0))
        self.register_buffer("bias", torch.randn(out_f, generator=g) if bias else torch.empty(0))

    def forward(self, x):
        return torch.ops.edgetk.codebook_gemm(x, self.codes, self.codebooks, self.perm, self.outlier_w, self.scale,
                                              self.bias, *self.meta)


class CodebookMLP(nn.Module):
    """Two VQ layers around a nonlinearity, as in a compressed MLP block."""

    def __init__(self, d=256, hidden=512, bits=2):
        super().__init__()
        self.up = CodebookLinear(hidden, d, vec_len=4, bits=bits, scale=True, bias=False, seed=1)
        self.down = CodebookLinear(d, hidden, vec_len=4, bits=bits, scale=True, bias=True, seed=2)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))
