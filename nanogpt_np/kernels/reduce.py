"""Python side of reduce.cu: the step's sums to device scalars and to gradients.

Each writes into an array the caller keeps (a device scalar, the gradient buffer),
so a training step allocates nothing and the host reads nothing until the one read
of (loss, norm^2) per optimizer step. The NumPy formula of each is in its docstring.
"""
import numpy as np

from ..backend import array_module

from .loader import KernelFile, ceil_div, ctype

_cu = KernelFile("reduce.cu",
                 [f"sum_squares_partial<{t}>" for t in ("float", "double", "bf16")]
                 + [f"sum_squares_finish<{t}>" for t in ("float", "double")]
                 + [f"loss_mean<{t}>" for t in ("float", "double")]
                 + [f"finish_partials<{t}>" for t in ("float", "double")])
THREADS = 256
SUM_SQUARES_BLOCKS = 264  # two per SM of an H100/H200: at most this many partial sums for the finish kernel
SUM_SQUARES_MIN_PER_THREAD = 32  # fewer blocks for a small g: no thread starts for fewer elements than this


def sum_squares(g, loss, report, part):
    """report = [loss[0], sum(g * g)] over the 1-D array g, in float64 (report: 2
    elements, part: SUM_SQUARES_BLOCKS, both float64; loss: a 1-element array)."""
    blocks = max(1, min(SUM_SQUARES_BLOCKS, ceil_div(g.size, THREADS * SUM_SQUARES_MIN_PER_THREAD)))
    _cu.launch(f"sum_squares_partial<{ctype(g.dtype)}>", (blocks,), (THREADS,), (g, np.int64(g.size), part))
    _cu.launch(f"sum_squares_finish<{ctype(loss.dtype)}>", (1,), (THREADS,), (part, np.int32(blocks), loss, report))
    return report


def loss_mean(losses, loss, scale, accumulate):
    """loss[0] = (loss[0] if accumulate else 0) + scale * losses.sum()  (one block, fixed order)."""
    _cu.launch(f"loss_mean<{ctype(losses.dtype)}>", (1,), (1024,),
               (losses, np.int32(losses.size), loss, np.dtype(losses.dtype).type(scale), np.int32(bool(accumulate))))
    return loss


class Partials:
    """Column partial sums of bias (and LayerNorm) gradients, one array for a model: the
    kernels that run anyway (cast_column_sums, bias_gelu_backward, ...) write each
    gradient's (n_chunks, width) partial sums into its slot, and one launch (finish)
    turns them into gradients:

        grads[name] = (grads[name] if accumulate else 0) + part[name].sum(axis=0)

    The slots are grouped by scope (a block): a scope's rows are width-of-the-scope
    apart, so each kernel's slot spans only its own block's partials."""

    def __init__(self, xp, n_chunks, dtype, scopes):
        """scopes: [[(grad name, width), ...], ...]; a LayerNorm's weight and bias, adjacent
        in the flat buffer, may share one slot of 2C (weight first)."""
        self.n_chunks, self.dtype = n_chunks, np.dtype(dtype)
        self.columns = {}  # name -> (first column overall, part offset, row stride, width)
        offset = column = 0
        for layout in scopes:
            stride = sum(width for _, width in layout)
            first = 0
            for name, width in layout:
                self.columns[name] = (column, offset + first, stride, width)
                column += width
                first += width
            offset += n_chunks * stride
        self.n_columns = column
        self.part = xp.empty(offset, dtype=self.dtype)
        self.segments = {}

    def slot(self, name):
        """(part from name's first partial sum to the end of its scope's block, as a 1-D
        array; the row stride) for a kernel to write its (n_chunks, width) sums into."""
        _, start, stride, width = self.columns[name]
        end = start + (self.n_chunks - 1) * stride + width
        return self.part[start:end], stride

    def place(self, name):
        """(the whole partials array, name's offset in it, the row stride): for a kernel
        that writes two gradients' partial sums into the one array."""
        _, start, stride, _ = self.columns[name]
        return self.part, start, stride

    def finish(self, grads, offsets, accumulate, names=None):
        """Add up the partials into `grads` (the flat gradient buffer; offsets: {name: its
        offset there}), for `names` (None: every name), in one launch."""
        key = None if names is None else tuple(names)
        segments = self.segments.get(key)
        if segments is None:  # the table of segments, on the device, made once per key
            chosen = self.columns if names is None else {n: self.columns[n] for n in names}
            table = [(column, start, stride, offsets[name], width)
                     for name, (column, start, stride, width) in chosen.items()]
            segments = self.segments[key] = array_module(self.part).asarray(np.array(table, dtype=np.int64))
        _cu.launch(f"finish_partials<{ctype(self.dtype)}>", (ceil_div(self.n_columns, THREADS),), (THREADS,),
                   (self.part, grads, segments, np.int32(segments.shape[0]), np.int32(self.n_chunks),
                    np.int32(self.n_columns), np.int32(bool(accumulate))))
