"""The intra-node NVLink exchange: Triton kernels write token rows directly into peers' buffers.

Each rank allocates one torch symmetric-memory buffer (multicast is never used) laid out as

    dispatch rows    [G * cap, H]   dispatch dtype (float8_e4m3fn with FP8 dispatch, else the activations')
    dispatch scales  [G * cap, H/128] float32      (FP8 dispatch only)
    dispatch meta    [G * cap, 2k]  int32: k local slots (-1: pair served elsewhere), k float32 weight bits
    counts           [G]            int64: rows each source wrote here
    combine rows     [G * cap, H]   activation dtype (BF16 combine)
    combine weights  [G * cap, k]   float32: pair-weight gradients coming back (backward only)

where cap = `max_tokens` (most tokens a rank dispatches in one call) and source r owns rows
[r * cap, (r + 1) * cap) of each region. Dispatch is one Triton kernel (quantise once per token, then
store the row, its scales and metadata into every destination's block for this rank, plus the counts)
and one barrier; combine is one Triton kernel (weighted sum of a received row's expert outputs, stored
into the source's combine region) and one barrier, then a local gather-sum of each token's copies.
Nothing is read back to the host, so both can be captured in a CUDA graph.

Buffer reuse: a dispatch overwrites the previous dispatch's rows, so a `Received` is valid until this
rank's next `dispatch`; the combine barrier guarantees every peer has finished reading before anyone
writes again (dispatch and combine must alternate).

Backward (training): combine's backward is a dispatch of the output gradients (the dispatch kernel, FP8 on
the wire with FP8 dispatch), dispatch's backward a combine of the row gradients and the pair-weight gradients
(the combine kernel with one pair per row, into the combine rows and combine weights regions, then the local
sum of each token's copies). Both keep the alternation above: backward runs the layers in reverse, each as
a dispatch then a combine.

`SymmMemExchange.loopback` builds G exchanges in one process over ordinary memory with a no-op barrier:
driven phase by phase (`dispatch_send` on every rank, then `dispatch_recv`, ...) it runs the same
kernels, which is how the kernels are tested on one device or in Triton's CPU interpreter.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._backend import use_triton
from .exchange import FP8_TILE, Exchange, Received
from .fp8 import FP8_DTYPE, dequantize_fp8, num_tiles
from .layout import DispatchLayout, ExpertLayout

__all__ = ["SymmMemExchange", "symmetric_buffer"]

_ALIGN = 128


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _BufferLayout:
    world_size: int
    cap: int
    hidden: int
    top_k: int
    dtype: torch.dtype
    fp8: bool

    @property
    def rows(self) -> int:
        return self.world_size * self.cap

    @property
    def send_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.fp8 else self.dtype

    @property
    def n_tiles(self) -> int:
        return num_tiles(self.hidden, FP8_TILE)

    @property
    def off_scales(self) -> int:
        return _up(self.rows * self.hidden * self.send_dtype.itemsize)

    @property
    def off_meta(self) -> int:
        return self.off_scales + (_up(self.rows * self.n_tiles * 4) if self.fp8 else 0)

    @property
    def off_counts(self) -> int:
        return self.off_meta + _up(self.rows * 2 * self.top_k * 4)

    @property
    def off_combine(self) -> int:
        return self.off_counts + _up(self.world_size * 8)

    @property
    def off_combine_w(self) -> int:
        return self.off_combine + _up(self.rows * self.hidden * self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return self.off_combine_w + _up(self.rows * self.top_k * 4)

    def view(self, buf: torch.Tensor, offset: int, shape: tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return buf[offset: offset + n * dtype.itemsize].view(dtype).view(shape)


def symmetric_buffer(nbytes: int, group: dist.ProcessGroup | None = None):
    """(uint8 [nbytes] tensor, handle): a symmetric-memory buffer on the current CUDA device, rendezvoused
    over `group` (collective). `handle.buffer_ptrs` are every rank's buffer as mapped here. Multicast off."""
    import torch.distributed._symmetric_memory as symm_mem

    group = group if group is not None else dist.group.WORLD
    if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
        # Multicast objects can take a shared NVSwitch host down; these kernels never need them.
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # required by older torch releases, a deprecated no-op in newer ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(group.group_name)
    device = torch.device("cuda", torch.cuda.current_device())
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    return buf, symm_mem.rendezvous(buf, group.group_name)


class SymmMemExchange(Exchange):
    """Dispatch/combine over NVLink through torch symmetric memory (one node, CUDA)."""

    capturable = True  # fixed buffers, device-side counts and barriers: nothing is read back

    def __init__(self, group: dist.ProcessGroup | None, max_tokens: int, hidden: int, top_k: int,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool = False):
        group = group if group is not None else dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        spec = self._spec(world, max_tokens, hidden, top_k, dtype, fp8)
        buf, handle = symmetric_buffer(spec.nbytes, group)
        bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=buf.device)
        self._setup(rank, spec, buf, bases, lambda: handle.barrier(channel=0))
        self._handle = handle  # keeps the peer mappings alive
        self.group = group  # gather_counts (the balanced replica rule) all-gathers over it

    @staticmethod
    def _spec(world: int, max_tokens: int, hidden: int, top_k: int, dtype: torch.dtype,
              fp8: bool) -> _BufferLayout:
        for name, value in (("max_tokens", max_tokens), ("hidden", hidden), ("top_k", top_k)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if fp8 and hidden % 16:
            raise ValueError(f"hidden: FP8 dispatch needs a multiple of 16, got {hidden}")
        return _BufferLayout(world, max_tokens, hidden, top_k, dtype, fp8)

    # Launch shape of both kernels: elements of a row one program moves, and warps per program.
    block_elems: int = 2048
    num_warps: int = 4

    def _setup(self, rank: int, spec: _BufferLayout, buf: torch.Tensor, bases: torch.Tensor,
               barrier: Callable[[], None]) -> None:
        self.rank, self.world_size, self.fp8 = rank, spec.world_size, spec.fp8
        self.spec, self._buf, self._bases, self._barrier = spec, buf, bases, barrier
        rows, H, k = spec.rows, spec.hidden, spec.top_k
        self._rows = spec.view(buf, 0, (rows, H), spec.send_dtype)
        self._scales = (spec.view(buf, spec.off_scales, (rows, spec.n_tiles), torch.float32)
                        if spec.fp8 else None)
        self._meta = spec.view(buf, spec.off_meta, (rows, 2 * k), torch.int32)
        self._counts = spec.view(buf, spec.off_counts, (spec.world_size,), torch.int64)
        self._combine = spec.view(buf, spec.off_combine, (rows, H), spec.dtype)
        self._combine_w = spec.view(buf, spec.off_combine_w, (rows, k), torch.float32)
        # Backward sends every received row back as one pair of weight 1: pair i is row i.
        self._own_pos = torch.arange(rows, device=buf.device)[:, None]
        self._ones = torch.ones((rows, 1), dtype=torch.float32, device=buf.device)
        self._row_pos = torch.arange(spec.cap, device=buf.device)[None, :]  # [1, cap]: row inside a block
        # Rows a source never wrote must not look like tokens before the first dispatch.
        self._counts.zero_()

    @classmethod
    def loopback(cls, world_size: int, max_tokens: int, hidden: int, top_k: int,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                 device: torch.device | str = "cpu") -> list[SymmMemExchange]:
        """`world_size` exchanges in this process over ordinary memory on `device`; barrier is a no-op.

        Drive them phase by phase: every rank's `dispatch_send`, then every rank's `dispatch_recv`, then
        `combine_send`, then `combine_recv`.
        """
        spec = cls._spec(world_size, max_tokens, hidden, top_k, dtype, fp8)
        bufs = [torch.zeros(spec.nbytes, dtype=torch.uint8, device=device) for _ in range(world_size)]
        bases = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=device)
        out = []
        board: dict[int, torch.Tensor] = {}  # gather_counts_send's rows, shared by the G exchanges
        for r in range(world_size):
            ex = cls.__new__(cls)
            ex._setup(r, spec, bufs[r], bases, lambda: None)
            ex._board = board
            out.append(ex)
        return out

    # ---- counts of the balanced replica rule (loopback: two phases, like the others) -----------------
    def gather_counts_send(self, counts: torch.Tensor) -> None:
        """Loopback phase 1 of `gather_counts`: post this rank's row."""
        self._board[self.rank] = counts.to(torch.int64)

    def gather_counts_recv(self) -> torch.Tensor:
        """Loopback phase 2 (after every rank's send): [G, E]."""
        return torch.stack([self._board[r] for r in range(self.world_size)])

    # ---- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, layout: DispatchLayout) -> Received:
        self.dispatch_send(x, layout)
        self._barrier()
        return self.dispatch_recv()

    def dispatch_send(self, x: torch.Tensor, layout: DispatchLayout) -> None:
        """Phase 1 of dispatch: write this rank's token copies into every destination's buffer."""
        from ._triton_symm import dispatch_kernel, tiles_per_program

        self._check_dispatch(x, layout)
        if not use_triton("auto", x):
            raise RuntimeError("SymmMemExchange: its kernels need CUDA tensors and Triton "
                               f"(or TRITON_INTERPRET=1 for CPU tensors); got x on {x.device}")
        spec = self.spec
        T, H = x.shape
        fits = spec.cap >= T and spec.hidden == H and spec.top_k == layout.top_k and spec.dtype == x.dtype
        if not fits:
            raise ValueError(f"x, layout: this exchange takes <= {spec.cap} tokens of hidden {spec.hidden}, "
                             f"top-{spec.top_k}, {spec.dtype}; got {T} x {H}, top-{layout.top_k}, {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        tpp = tiles_per_program(H, FP8_TILE, self.block_elems)
        grid = (max(T, 1), -(-spec.n_tiles // tpp))
        dispatch_kernel[grid](
            x, x.stride(0), layout.gpus, layout.slots, layout.weights.contiguous(), layout.dests,
            layout.dest_rows, layout.send_counts, self._bases,
            T, H, spec.n_tiles, self.rank, spec.cap, spec.off_scales, spec.off_meta, spec.off_counts,
            K=spec.top_k, KP=_pow2(spec.top_k), D=layout.dests.shape[1], G=spec.world_size,
            GP=_pow2(spec.world_size), FP8=spec.fp8, TILE=FP8_TILE, TPP=tpp,
            TINY=1e-30, num_warps=self.num_warps,
        )
        self.last_dispatch = self._traffic(layout.send_counts, H, spec.send_dtype.itemsize, spec.top_k,
                                           spec.fp8)

    def dispatch_recv(self) -> Received:
        """Phase 2 of dispatch (after the barrier): views of what the peers wrote here."""
        # Views only (one comparison kernel for `valid`): they stay valid until this rank's next dispatch.
        k = self.spec.top_k
        valid = (self._row_pos < self._counts[:, None]).view(-1)
        slots = self._meta[:, :k]
        weights = self._meta[:, k:].view(torch.float32)
        return Received(self._rows, self._scales, slots, weights, self._counts, valid)

    # ---- combine -----------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, experts: ExpertLayout, received: Received,
                layout: DispatchLayout) -> torch.Tensor:
        self.combine_send(y, experts, received)
        self._barrier()
        return self.combine_recv(layout)

    def combine_send(self, y: torch.Tensor, experts: ExpertLayout, received: Received) -> None:
        """Phase 1 of combine: reduce each received row's expert outputs, write it back to its source."""
        from ._triton_symm import combine_kernel

        spec = self.spec
        if y.dim() != 2 or y.shape[1] != spec.hidden or y.dtype != spec.dtype:
            raise ValueError(f"y: expected [M, {spec.hidden}] {spec.dtype}, got {list(y.shape)} {y.dtype}")
        if tuple(experts.pair_pos.shape) != (spec.rows, spec.top_k):
            raise ValueError(f"experts: expected pair_pos [{spec.rows}, {spec.top_k}] for this exchange's "
                             f"buffers, got {list(experts.pair_pos.shape)}")
        if y.shape[0] == 0:  # nothing computed here: no pair can point at a row
            y = torch.zeros((1, spec.hidden), dtype=y.dtype, device=y.device)
        if y.stride(1) != 1:
            y = y.contiguous()
        weights = received.weights if received.weights.stride(1) == 1 else received.weights.contiguous()
        block = min(_pow2(spec.hidden), self.block_elems)
        grid = (spec.rows, -(-spec.hidden // block))
        combine_kernel[grid](
            y, y.stride(0), experts.pair_pos.contiguous(), weights, weights.stride(0), received.counts,
            self._bases, spec.hidden, self.rank, spec.cap, spec.off_combine, K=spec.top_k, BLOCK=block,
            num_warps=self.num_warps,
        )
        self.last_combine = self._traffic(received.counts, spec.hidden, spec.dtype.itemsize, 0, False)

    def combine_recv(self, layout: DispatchLayout) -> torch.Tensor:
        """Phase 2 of combine (after the barrier): [T, H] sum of each token's returned copies."""
        from ._triton_symm import gather_copies_kernel

        spec = self.spec
        T, D = layout.dests.shape
        out = torch.empty((T, spec.hidden), dtype=spec.dtype, device=self._combine.device)
        if T:
            block = min(_pow2(spec.hidden), self.block_elems)
            gather_copies_kernel[(T, -(-spec.hidden // block))](
                self._combine, layout.dests, layout.dest_rows, out, spec.hidden, spec.cap, D=D, BLOCK=block,
                num_warps=self.num_warps)
        return out

    # ---- backward (training) -----------------------------------------------------------------------
    def combine_backward(self, grad_out: torch.Tensor, received: Received, layout: DispatchLayout) -> torch.Tensor:
        self.combine_backward_send(grad_out, layout)
        self._barrier()
        return self.combine_backward_recv()

    def combine_backward_send(self, grad_out: torch.Tensor, layout: DispatchLayout) -> None:
        """Phase 1 of combine's backward: each token's output gradient to every rank holding a copy."""
        self.dispatch_send(grad_out, layout)

    def combine_backward_recv(self) -> torch.Tensor:
        """Phase 2 (after the barrier): [G * cap, H] row gradients in the activation dtype (a new tensor)."""
        if self.spec.fp8:
            return dequantize_fp8(self._rows, self._scales, FP8_TILE, self.spec.dtype)
        return self._rows.clone()

    def dispatch_backward(self, grad_rows: torch.Tensor, grad_weights: torch.Tensor, received: Received,
                          layout: DispatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        self.dispatch_backward_send(grad_rows, grad_weights, received)
        self._barrier()
        return self.dispatch_backward_recv(layout)

    def dispatch_backward_send(self, grad_rows: torch.Tensor, grad_weights: torch.Tensor,
                               received: Received) -> None:
        """Phase 1 of dispatch's backward: every received row's gradient [G * cap, H] and its pair-weight
        gradients [G * cap, k] back into the source's combine regions."""
        from ._triton_symm import combine_kernel

        spec = self.spec
        if tuple(grad_rows.shape) != (spec.rows, spec.hidden) or grad_rows.dtype != spec.dtype:
            raise ValueError(f"grad_rows: expected [{spec.rows}, {spec.hidden}] {spec.dtype}, "
                             f"got {list(grad_rows.shape)} {grad_rows.dtype}")
        if tuple(grad_weights.shape) != (spec.rows, spec.top_k):
            raise ValueError(f"grad_weights: expected [{spec.rows}, {spec.top_k}], got {list(grad_weights.shape)}")
        for y, width, offset in ((grad_rows.contiguous(), spec.hidden, spec.off_combine),
                                 (grad_weights.float().contiguous(), spec.top_k, spec.off_combine_w)):
            block = max(16, min(_pow2(width), self.block_elems))
            combine_kernel[(spec.rows, -(-width // block))](
                y, y.stride(0), self._own_pos, self._ones, 1, received.counts, self._bases, width, self.rank,
                spec.cap, offset, K=1, BLOCK=block, num_warps=self.num_warps)

    def dispatch_backward_recv(self, layout: DispatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 2 (after the barrier): (grad_x [T, H], grad_weights float32 [T, k]), copies summed."""
        from ._triton_symm import gather_copies_kernel

        spec = self.spec
        T, D = layout.dests.shape
        grad_w = torch.empty((T, spec.top_k), dtype=torch.float32, device=self._combine.device)
        if T:
            block = max(16, _pow2(spec.top_k))
            gather_copies_kernel[(T, 1)](self._combine_w, layout.dests, layout.dest_rows, grad_w, spec.top_k,
                                         spec.cap, D=D, BLOCK=block, num_warps=1)
        return self.combine_recv(layout), grad_w
