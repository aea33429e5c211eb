"""Palettized modules: weights shared through a k-means codebook, stored as bit-packed indices.

A palettized layer keeps, instead of its float weight,

* ``indices``: a ``uint8`` buffer with one ``bits``-wide cluster index per weight, packed back to
  back (``bits = ceil(log2(clusters))``: 4 bits for 16 clusters), in the row-major order of the
  weight, and
* ``codebook``: a float32 :class:`~torch.nn.Parameter` of shape ``(codebooks, clusters)``, one
  row of centroids per group of ``group_size`` output channels (a single row when the whole
  tensor shares one codebook).

The forward rebuilds the weight as ``codebook[group, index]`` and calls the float kernel, so its
output equals that of the dense layer holding the clustered weight, exactly. The weight is rebuilt
under autograd, so the gradient reaching a centroid is the sum of the gradients of every weight
assigned to it: a trainer fine-tunes the centroids while the assignment stays fixed. A reserved
zero centroid (``zero_code``, for layers pruned before) is held at zero, so pruned weights stay
pruned through training.

Set ``cache = True`` on a module (or call :func:`set_cache` on a model) to keep the rebuilt weight
between forwards: the cache lives outside the module state (never saved), is rebuilt when the
codebook or the indices change, and is bypassed while gradients flow to the codebook.

The k-means itself (:func:`kmeans_1d`) is one-dimensional: k-means++ seeding, then exact Lloyd
iterations on the sorted weights, where each iteration costs a binary search per centroid.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.modules import is_hf_conv1d

__all__ = [
    "MAX_CLUSTERS",
    "PalettizedConv2d",
    "PalettizedLinear",
    "bits_for",
    "kmeans_1d",
    "pack_bits",
    "packed_bytes",
    "palettize",
    "set_cache",
    "unpack_bits",
]

#: The largest codebook: 16-bit indices.
MAX_CLUSTERS = 2**16
#: Up to this many weighted summaries of the sorted weights seed k-means++ (per codebook).
SKETCH = 8192

# rebuilt weights, per module (a cache, never saved)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, torch.Tensor]] = weakref.WeakKeyDictionary()


# -- bit packing ---------------------------------------------------------------------------------
def bits_for(clusters: int) -> int:
    """Bits per index for a codebook of ``clusters`` entries: ``ceil(log2(clusters))``, >= 1.

    >>> [bits_for(k) for k in (2, 3, 16, 17, 256, 65536)]
    [1, 2, 4, 5, 8, 16]
    """
    return max(1, (int(clusters) - 1).bit_length())


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that hold ``count`` indices of ``bits`` bits each."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}.")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a ``uint8`` tensor, ``bits`` bits each.

    The layout is a little-endian bit stream: code ``i`` occupies stream bits
    ``i*bits .. i*bits + bits - 1`` (least significant first), and byte ``j`` holds stream bits
    ``8j .. 8j + 7``. The result has :func:`packed_bytes` ``(codes.numel(), bits)`` bytes.

    Args:
        codes: integer tensor (any shape; flattened in row-major order).
        bits: 1 to 16.

    Returns:
        A 1-D ``uint8`` tensor on the codes' device.

    Raises:
        ValueError: for ``bits`` outside ``[1, 16]`` or codes outside ``[0, 2**bits)``.

    Example:
        >>> import torch
        >>> pack_bits(torch.tensor([1, 2, 3]), 4)
        tensor([33,  3], dtype=torch.uint8)
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_bits: codes must be integers, got {codes.dtype}.")
    c = codes.reshape(-1).to(torch.int64)
    n = c.numel()
    if n and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(
            f"pack_bits: codes must lie in [0, {2**bits - 1}] for {bits} bits, got values in "
            f"[{int(c.min())}, {int(c.max())}]."
        )
    nbytes = packed_bytes(n, bits)
    if bits == 8:
        return c.to(torch.uint8)
    if bits == 16:
        return torch.stack([c & 0xFF, c >> 8], dim=1).reshape(-1).to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        c = F.pad(c, (0, nbytes * per - n)).reshape(nbytes, per)
        shifts = torch.arange(per, device=c.device) * bits
        return (c << shifts).sum(dim=1).to(torch.uint8)
    # general width: each code spans at most 3 bytes; bits never overlap, so adding is or-ing
    pos = torch.arange(n, device=c.device) * bits
    first = pos >> 3
    v = c << (pos & 7)
    out = torch.zeros(nbytes + 2, dtype=torch.int64, device=c.device)
    for j in range(3):
        out.scatter_add_(0, first + j, (v >> (8 * j)) & 0xFF)
    return out[:nbytes].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as ``int64``.

    Raises:
        ValueError: for a bad ``bits`` or a buffer too short for ``count`` codes.

    Example:
        >>> import torch
        >>> unpack_bits(pack_bits(torch.tensor([5, 0, 31, 7]), 5), 5, 4)
        tensor([ 5,  0, 31,  7])
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"unpack_bits: expected a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}."
        )
    if packed.numel() < packed_bytes(count, bits):
        raise ValueError(
            f"unpack_bits: {packed.numel()} bytes cannot hold {count} codes of {bits} bits "
            f"({packed_bytes(count, bits)} bytes needed)."
        )
    if bits == 8:
        return packed[:count].to(torch.int64)
    if bits == 16:
        p = packed[: 2 * count].to(torch.int64).reshape(count, 2)
        return p[:, 0] | (p[:, 1] << 8)
    # the layout repeats every lcm(bits, 8) bits: `per` codes in `width` bytes; unpack chunk
    # columns (one per code position) rather than gathering bytes code by code
    period = math.lcm(bits, 8)
    per, width = period // bits, period // 8
    chunks = -(-count // per)
    p = packed[: chunks * width]
    if p.numel() < chunks * width:
        p = F.pad(p, (0, chunks * width - p.numel()))
    p = p.reshape(chunks, width)
    if width == 1:
        shifts = torch.arange(per, device=p.device, dtype=torch.uint8) * bits
        c = (p >> shifts) & (2**bits - 1)
        return c.reshape(-1)[:count].to(torch.int64)
    p = p.to(torch.int32)
    cols = []
    for j in range(per):
        first, shift = divmod(j * bits, 8)
        v = p[:, first]
        for extra in range(1, 3):
            if first + extra < width and 8 * extra < shift + bits:
                v = v | (p[:, first + extra] << (8 * extra))
        cols.append((v >> shift) & (2**bits - 1))
    return torch.stack(cols, 1).reshape(-1)[:count].to(torch.int64)


# -- k-means -------------------------------------------------------------------------------------
def kmeans_1d(
    values: torch.Tensor,
    clusters: int,
    weights: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means of each row of ``values``, deterministic for a ``seed``.

    A row with at most ``clusters`` distinct values gets exactly those values as centroids (so
    its reconstruction is exact). Other rows are seeded with k-means++ (importance-weighted
    ``D^2`` sampling; on up to 8192 run means of the sorted row, weighted by their total
    weight, when the row is longer) and refined with Lloyd iterations on every value: in one
    dimension each cluster is a contiguous run of the sorted values, so an iteration is a binary
    search per centroid plus prefix sums.

    Args:
        values: ``(rows, n)`` finite floats (a 1-D tensor is one row).
        clusters: centroids per row (>= 1).
        weights: ``(rows, n)`` non-negative importances (``None``: all equal). A row whose
            weights are all zero is clustered unweighted.
        mask: ``(rows, n)`` booleans: only ``True`` values are clustered; the codes of the others
            are meaningless (the caller overrides them).
        seed: seed of the k-means++ sampling.
        max_iter: Lloyd iterations at most.

    Returns:
        ``(centroids, codes)``: float32 ``(rows, K)`` sorted centroids, ``K <= clusters`` (fewer
        only when no row needs ``clusters``), and int64 ``(rows, n)`` indices into them.

    Example:
        >>> import torch
        >>> c, i = kmeans_1d(torch.tensor([0.0, 0.1, 0.9, 1.0, 5.0]), 2)
        >>> c, i
        (tensor([[0.5000, 5.0000]]), tensor([[0, 0, 0, 0, 1]]))
    """
    if clusters < 1:
        raise ValueError(f"kmeans_1d: clusters must be >= 1, got {clusters}.")
    x = values.detach().to("cpu", torch.float64)
    if x.dim() == 1:
        x = x[None]
    rows, n = x.shape
    if n == 0:
        return torch.zeros(rows, 1), torch.zeros(rows, 0, dtype=torch.int64)
    w = (
        torch.ones_like(x)
        if weights is None
        else weights.detach().to("cpu", torch.float64).reshape(rows, n).clamp_min(0)
    )
    if mask is not None:
        m = mask.detach().to("cpu").reshape(rows, n).bool()
        # masked values: weight 0, value of a clustered one (so they add no distinct value)
        anchor = torch.where(m.any(1), x.masked_fill(~m, float("inf")).amin(1), 0.0)
        x = torch.where(m, x, anchor[:, None])
        w = w * m
    else:
        m = torch.ones_like(x, dtype=torch.bool)
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w, m.to(w.dtype))
    # a floor so that every clustered value keeps some pull (importances may be exactly zero)
    mean = w.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
    w = torch.where(m, w + 1e-4 * mean, w)

    xs, order = x.sort(dim=1)
    new = torch.ones_like(xs, dtype=torch.bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    distinct = new.sum(1)
    exact = distinct <= clusters
    width = clusters if bool((~exact).any()) else int(distinct.max())
    cent = torch.empty(rows, width, dtype=torch.float64)
    if bool(exact.any()):
        e_xs, e_new = xs[exact], new[exact]
        rank = e_new.cumsum(1) - 1
        ce = e_xs[:, -1:].expand(-1, width).clone()  # pad with the largest value
        ce.scatter_(1, rank, e_xs)
        cent[exact] = ce
    if bool((~exact).any()):
        km = ~exact
        cent[km] = _lloyd(xs[km], w.gather(1, order)[km], clusters, seed, max_iter)
    cent32 = cent.float()
    c64 = cent32.double()
    codes = torch.empty(rows, n, dtype=torch.int64)
    if bool(exact.any()):
        codes[exact] = torch.searchsorted(c64[exact].contiguous(), x[exact].contiguous())
    if bool((~exact).any()):
        ck = c64[~exact]
        mids = ((ck[:, 1:] + ck[:, :-1]) / 2).contiguous()
        codes[~exact] = torch.searchsorted(mids, x[~exact].contiguous())
    return cent32, codes


def _sample(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row, drawn with probability proportional to ``p`` (inverse CDF)."""
    c = p.cumsum(1)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=c.dtype) * c[:, -1:]
    return torch.searchsorted(c, u, right=True).clamp_max(p.shape[1] - 1)


def _lloyd(xs: torch.Tensor, ws: torch.Tensor, k: int, seed: int, max_iter: int) -> torch.Tensor:
    """k-means++ then Lloyd on sorted rows ``xs`` with weights ``ws``; sorted centroids."""
    rows, n = xs.shape
    cw = F.pad(ws.cumsum(1), (1, 0))
    cwx = F.pad((ws * xs).cumsum(1), (1, 0))
    if n > SKETCH:
        edges = torch.linspace(0, n, SKETCH + 1, dtype=torch.float64).round().long()
        cx = F.pad(xs.cumsum(1), (1, 0))
        cnt = (edges[1:] - edges[:-1]).to(xs.dtype)
        pts = (cx[:, edges[1:]] - cx[:, edges[:-1]]) / cnt
        pw = cw[:, edges[1:]] - cw[:, edges[:-1]]
    else:
        pts, pw = xs, ws
    gen = torch.Generator().manual_seed(int(seed))
    cent = torch.empty(rows, k, dtype=torch.float64)
    cent[:, :1] = pts.gather(1, _sample(pw, gen))
    d2 = (pts - cent[:, :1]) ** 2
    for j in range(1, k):
        p = pw * d2
        dead = p.sum(1, keepdim=True) <= 0  # every point is a centroid already
        cj = pts.gather(1, _sample(torch.where(dead, pw, p), gen))
        cent[:, j : j + 1] = cj
        d2 = torch.minimum(d2, (pts - cj) ** 2)
    cent = cent.sort(1).values
    span = (xs[:, -1] - xs[:, 0]).clamp_min(1e-30)[:, None]
    lo = torch.zeros(rows, 1, dtype=torch.long)
    hi = torch.full((rows, 1), n, dtype=torch.long)
    for _ in range(max_iter):
        mids = ((cent[:, 1:] + cent[:, :-1]) / 2).contiguous()
        edges = torch.cat([lo, torch.searchsorted(xs, mids), hi], 1)
        sw = cw.gather(1, edges[:, 1:]) - cw.gather(1, edges[:, :-1])
        swx = cwx.gather(1, edges[:, 1:]) - cwx.gather(1, edges[:, :-1])
        upd = torch.where(sw > 0, swx / sw.clamp_min(1e-300), cent).sort(1).values
        done = bool(((upd - cent).abs() <= 1e-12 * span).all())
        cent = upd
        if done:
            break
    return cent


def palettize(
    weight: torch.Tensor,
    clusters: int,
    *,
    group_size: int | None = None,
    importance: torch.Tensor | None = None,
    keep_zeros: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cluster a weight into codebooks: one per ``group_size`` output channels (dim 0).

    Args:
        weight: ``(out, ...)`` finite float weight.
        clusters: codebook entries (the reserved zero included when ``keep_zeros``).
        group_size: output channels per codebook (``None``: one codebook for the tensor).
        importance: per-weight importances of the weighted k-means (same shape as ``weight``).
        keep_zeros: reserve entry 0 of every codebook for an exact zero and map every zero
            weight to it (the other weights are clustered into ``clusters - 1`` entries).
        seed: k-means++ seed.

    Returns:
        ``(codebook, codes, zero_code)``: float32 ``(codebooks, K)``, int64 ``(out, n)`` codes
        (``n`` weights per output channel) and the reserved index (``-1``: none).
    """
    if not 1 <= clusters <= MAX_CLUSTERS or (keep_zeros and clusters < 2):
        raise ValueError(
            f"palettize: clusters must be in [{2 if keep_zeros else 1}, {MAX_CLUSTERS}], got "
            f"{clusters}."
        )
    out = weight.shape[0]
    w = weight.detach().reshape(out, -1).to("cpu", torch.float64)
    per = w.shape[1]
    gs = out if group_size is None else min(int(group_size), out)
    imp = None if importance is None else importance.detach().reshape(out, per).cpu()
    k = clusters - 1 if keep_zeros else clusters
    full, rest = divmod(out, gs)
    parts = []
    for start, nrows, ngroups in ((0, full * gs, full), (full * gs, rest, 1)):
        if nrows == 0:
            continue
        vals = w[start : start + nrows].reshape(ngroups, -1)
        wt = None if imp is None else imp[start : start + nrows].reshape(ngroups, -1)
        msk = vals != 0 if keep_zeros else None
        cent, codes = kmeans_1d(vals, k, wt, mask=msk, seed=seed)
        if msk is not None:
            cent = torch.cat([torch.zeros(ngroups, 1), cent], 1)
            codes = torch.where(msk, codes + 1, 0)
        parts.append((cent, codes.reshape(nrows, per)))
    width = max(c.shape[1] for c, _ in parts)
    books = [
        torch.cat([c, c[:, -1:].expand(-1, width - c.shape[1])], 1) if c.shape[1] < width else c
        for c, _ in parts
    ]
    codebook = torch.cat(books, 0).contiguous()
    codes = torch.cat([c for _, c in parts], 0)
    return codebook, codes, (0 if keep_zeros else -1)


# -- modules -------------------------------------------------------------------------------------
class _Palettized(nn.Module):
    """Storage and weight reconstruction shared by the palettized layers."""

    bits: int
    clusters: int
    group_size: int
    zero_code: int
    cache: bool
    indices: torch.Tensor
    codebook: nn.Parameter
    bias: nn.Parameter | None

    def _init_palette(
        self,
        rows: int,
        per_row: int,
        clusters: int,
        group_size: int | None,
        zero_code: int,
        cache: bool,
    ) -> None:
        if not 1 <= clusters <= MAX_CLUSTERS:
            raise ValueError(
                f"{type(self).__name__}: clusters must be in [1, {MAX_CLUSTERS}], got {clusters}."
            )
        if group_size is not None and int(group_size) < 1:
            raise ValueError(
                f"{type(self).__name__}: group_size must be a positive number of output channels "
                f"per codebook (or None for one codebook), got {group_size}."
            )
        gs = rows if group_size is None else min(int(group_size), rows)
        if not -1 <= zero_code < clusters:
            raise ValueError(
                f"{type(self).__name__}: zero_code must be -1 (none) or an index below "
                f"{clusters}, got {zero_code}."
            )
        self.clusters = int(clusters)
        self.bits = bits_for(clusters)
        self.group_size = gs
        self.zero_code = int(zero_code)
        self.cache = bool(cache)
        self.register_buffer(
            "indices", torch.zeros(packed_bytes(rows * per_row, self.bits), dtype=torch.uint8)
        )
        self.codebook = nn.Parameter(torch.zeros(-(-rows // gs), clusters))

    # subclasses define the weight's shape
    def _weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _load(self, codebook: torch.Tensor, codes: torch.Tensor, bias: Any) -> None:
        rows = self._weight_shape()[0]
        if tuple(codebook.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"{type(self).__name__}: codebook of shape {tuple(codebook.shape)}, expected "
                f"{tuple(self.codebook.shape)}."
            )
        if codes.dim() != 2 or codes.shape[0] != rows or codes.numel() != self.numel:
            raise ValueError(
                f"{type(self).__name__}: codes of shape {tuple(codes.shape)}, expected "
                f"({rows}, {self.numel // max(rows, 1)})."
            )
        dev = codebook.device
        self.indices = pack_bits(codes.to(dev), self.bits)
        self.codebook = nn.Parameter(codebook.detach().to(dev, torch.float32).clone())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())

    @property
    def numel(self) -> int:
        """Number of weights the indices stand for."""
        return math.prod(self._weight_shape())

    def codes(self) -> torch.Tensor:
        """The cluster index of every weight, ``(out, n)`` int64 (``n`` weights per channel)."""
        rows = self._weight_shape()[0]
        return unpack_bits(self.indices, self.bits, self.numel).reshape(rows, -1)

    def dequantize(self) -> torch.Tensor:
        """The clustered weight, rebuilt from the codebook (differentiable in the codebook)."""
        shape = self._weight_shape()
        codes = self.codes()
        cb = self.codebook
        if self.zero_code >= 0:  # held at zero: no gradient reaches it
            cb = cb.index_fill(1, torch.tensor([self.zero_code], device=cb.device), 0.0)
        group = torch.arange(shape[0], device=cb.device) // self.group_size
        return cb.index_select(0, group).gather(1, codes).reshape(shape)

    def _weight(self) -> torch.Tensor:
        if not self.cache or (torch.is_grad_enabled() and self.codebook.requires_grad):
            return self.dequantize()
        key = (
            self.indices.data_ptr(),
            self.indices._version,
            self.codebook.data_ptr(),
            self.codebook._version,
            self.codebook.device,
        )
        hit = _CACHE.get(self)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, self.dequantize())
            _CACHE[self] = hit
        return hit[1]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        _CACHE.pop(self, None)  # moved or converted: the cached weight is stale, free it now
        return super()._apply(fn, recurse)

    @property
    def weight(self) -> torch.Tensor:
        """The clustered weight (rebuilt, or the cached copy): read-only."""
        return self._weight()

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"indices": self.numel}

    def nnslim_zero_weights(self) -> int:
        with torch.no_grad():
            return int((self.dequantize() == 0).sum())

    def _palette_repr(self) -> str:
        return f"clusters={self.clusters}, bits={self.bits}, group_size={self.group_size}" + (
            f", zero_code={self.zero_code}" if self.zero_code >= 0 else ""
        )


def set_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the rebuilt-weight cache of every palettized module in ``model`` on or off.

    Returns:
        The number of palettized modules.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, _Palettized):
            m.cache = bool(enabled)
            if not enabled:
                _CACHE.pop(m, None)
            n += 1
    return n


class PalettizedLinear(_Palettized):
    """``nn.Linear`` whose weight is a k-means codebook plus bit-packed indices.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether there is a (float) bias.
        clusters: codebook entries (1 to 65536); indices take ``ceil(log2(clusters))`` bits.
        group_size: output channels per codebook (``None``: one codebook for the weight).
        zero_code: codebook index held at zero (``-1``: none).
        cache: keep the rebuilt weight between forwards (see the module docs).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(64, 8)
        >>> p = PalettizedLinear.from_float(lin, clusters=16)
        >>> p.bits, tuple(p.indices.shape), tuple(p.codebook.shape)
        (4, (256,), (1, 16))
        >>> x = torch.randn(3, 64)
        >>> torch.equal(p(x), torch.nn.functional.linear(x, p.weight, lin.bias))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        clusters: int = 16,
        group_size: int | None = None,
        zero_code: int = -1,
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_palette(out_features, in_features, clusters, group_size, zero_code, cache)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_codes(
        cls,
        linear: nn.Module,
        codebook: torch.Tensor,
        codes: torch.Tensor,
        group_size: int | None = None,
        zero_code: int = -1,
    ) -> PalettizedLinear:
        """Build from a codebook ``(codebooks, K)`` and codes ``(out, in)`` (see :func:`palettize`).

        ``linear`` (an ``nn.Linear`` or Hugging Face ``Conv1D``) supplies the shape and bias.
        """
        out, inp = codes.shape
        m = cls(inp, out, linear.bias is not None, codebook.shape[1], group_size, zero_code)
        m._load(codebook, codes, linear.bias)
        return m

    @classmethod
    def from_float(
        cls,
        linear: nn.Module,
        clusters: int = 16,
        *,
        group_size: int | None = None,
        importance: torch.Tensor | None = None,
        keep_zeros: bool = False,
        seed: int = 0,
    ) -> PalettizedLinear:
        """Cluster an ``nn.Linear``/``Conv1D`` (see :func:`palettize` for the arguments)."""
        w = linear.weight.t() if is_hf_conv1d(linear) else linear.weight
        imp = importance.t() if importance is not None and is_hf_conv1d(linear) else importance
        book, codes, zc = palettize(
            w, clusters, group_size=group_size, importance=imp, keep_zeros=keep_zeros, seed=seed
        )
        return cls.from_codes(linear, book.to(w.device), codes, group_size, zc)

    def nnslim_describe(self) -> str:
        return f"PalettizedLinear {self.in_features}->{self.out_features} c{self.clusters}"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, " + self._palette_repr()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight().to(x.dtype), self.bias)


class PalettizedConv2d(_Palettized):
    """``nn.Conv2d`` whose weight is a k-means codebook plus bit-packed indices.

    The convolution arguments are those of ``nn.Conv2d``; ``clusters``, ``group_size``,
    ``zero_code`` and ``cache`` as for :class:`PalettizedLinear` (``group_size`` counts output
    channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        clusters: int = 16,
        group_size: int | None = None,
        zero_code: int = -1,
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        per = (in_channels // groups) * math.prod(self.kernel_size)
        self._init_palette(out_channels, per, clusters, group_size, zero_code, cache)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_codes(
        cls,
        conv: nn.Conv2d,
        codebook: torch.Tensor,
        codes: torch.Tensor,
        group_size: int | None = None,
        zero_code: int = -1,
    ) -> PalettizedConv2d:
        """Build from a codebook and codes ``(out, in/groups * kh * kw)`` (see :func:`palettize`)."""
        m = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            codebook.shape[1],
            group_size,
            zero_code,
        )
        m._load(codebook, codes, conv.bias)
        return m

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        clusters: int = 16,
        *,
        group_size: int | None = None,
        importance: torch.Tensor | None = None,
        keep_zeros: bool = False,
        seed: int = 0,
    ) -> PalettizedConv2d:
        """Cluster an ``nn.Conv2d`` (see :func:`palettize` for the arguments)."""
        book, codes, zc = palettize(
            conv.weight,
            clusters,
            group_size=group_size,
            importance=importance,
            keep_zeros=keep_zeros,
            seed=seed,
        )
        return cls.from_codes(conv, book.to(conv.weight.device), codes, group_size, zc)

    def nnslim_describe(self) -> str:
        k = "x".join(str(s) for s in self.kernel_size)
        return f"PalettizedConv2d {self.in_channels}->{self.out_channels} k{k} c{self.clusters}"

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode}, " + self._palette_repr()
        )

    def _reversed_padding(self) -> list[int]:
        # as nn.Conv2d computes _reversed_padding_repeated_twice
        if isinstance(self.padding, str):
            out = [0, 0] * len(self.kernel_size)
            if self.padding == "same":
                for d, k, i in zip(
                    self.dilation, self.kernel_size, range(len(self.kernel_size) - 1, -1, -1)
                ):
                    total = d * (k - 1)
                    out[2 * i] = total // 2
                    out[2 * i + 1] = total - total // 2
            return out
        return [p for p in reversed(self.padding) for _ in range(2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight().to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding(), mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
