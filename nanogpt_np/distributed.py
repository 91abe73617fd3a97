"""Data parallelism over MPI: one process (rank) per device, gradients averaged.

    mpiexec -n 8 python scripts/train.py --backend cupy

Every rank holds a full copy of the model and reads its own slice of each batch.
After the last micro-step of gradient accumulation the ranks sum their gradients
with one allreduce over the model's flat gradient buffer and divide by the world
size, so every rank takes the same optimizer step and the copies stay identical.

A single process never imports mpi4py: `init()` looks at the variables MPI
launchers set (PMI_SIZE, OMPI_COMM_WORLD_SIZE, ...) and returns a `Single` that
does nothing when there is only one rank.

Gradient transports. NumPy buffers go straight to mpi4py's buffer methods
(`Allreduce` with `MPI.IN_PLACE`, never the pickling lowercase methods). CuPy
buffers go through one of three transports behind the same `allreduce_sum_`:
  - NCCL (`cupy.cuda.nccl`), bootstrapped by broadcasting its unique id over MPI:
    the fast path, since the pip MPI wheels are not GPU-aware;
  - CUDA-aware MPI, when the MPI library reports it (`MPIX_Query_cuda_support`);
  - host staging: copy to the host, MPI allreduce, copy back.
`NANOGPT_GPU_ALLREDUCE=nccl|cuda-aware-mpi|host` forces one.

Overlap. The allreduce need not wait for the whole backward: `gradient_buckets`
sends each stretch of the flat buffer as soon as backward has finished it (see
GradientBuckets), on a second CUDA stream under NCCL, so communication runs under
the remaining backward. The other transports, NumPy's included, send one
allreduce after backward (see OneReduceAfterBackward and HostMPITransport).

Watched. Every collective below goes through `self.watch.collective(name)`
(watchdog.CollectiveWatch), so that a watchdog thread can end the job when one
does not complete within --collective-timeout, naming the ranks that never came
(watchdog.py); the same note times what each rank spends waiting in collectives.
"""
import ctypes
import importlib
import json
import os
import sys
import time
import traceback

import numpy as np

from .backend import array_module, data_pointer, to_host, use_gpu
from .watchdog import CollectiveWatch

# variables MPI launchers set to the world size: MPICH/Hydra and Intel MPI, Open MPI, MVAPICH
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
TRANSPORT_ENV = "NANOGPT_GPU_ALLREDUCE"
TRANSPORTS = ("nccl", "cuda-aware-mpi", "host")
# MPI_Abort kills every rank at once; the launcher may not have forwarded the
# failing rank's last words yet, so they get this long to go out first
ABORT_GRACE_SECONDS = 0.5
# gradient bytes per overlapped allreduce (PyTorch DDP's default bucket size); 0: one
# allreduce of the whole buffer after backward
DEFAULT_BUCKET_BYTES = 25 * 2**20


def launched_world_size(env=None):
    """The world size an MPI launcher announced in the environment (1 if none)."""
    env = os.environ if env is None else env
    for var in LAUNCHER_SIZE_VARS:
        if env.get(var, "").isdigit():
            return int(env[var])
    return 1


def init(env=None):
    """`Single()` for one process, else an `MPIDistributed` over COMM_WORLD.
    NANOGPT_MPI=1 takes MPI (and, on GPUs, NCCL) even for one rank, so
    `mpiexec -n 1` runs the multi-rank code path (gpu_check does, on one GPU)."""
    env = os.environ if env is None else env
    forced = env.get("NANOGPT_MPI") == "1"
    if launched_world_size(env) <= 1 and not forced:
        return Single()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1 and not forced:
        return Single()
    return MPIDistributed(MPI.COMM_WORLD, MPI, env)


class Single:
    """One process: every collective is the identity."""

    rank, world_size, local_rank, local_size = 0, 1, 0, 1
    watch = None  # no collectives, nothing to watch

    @property
    def is_master(self):
        return self.rank == 0

    def barrier(self):
        pass

    def allreduce_sum_(self, buf):
        return buf

    def allreduce_mean_(self, buf):
        """Average a contiguous buffer (the flat gradients) over ranks, in place."""
        return buf

    def allreduce_scalars(self, values, op="sum", name=None):
        """[float] -> [float] summed (or averaged with op='mean') over ranks. name: what
        the numbers are, for the watchdog's message."""
        return [float(v) for v in values]

    def gradient_buckets(self, flat, bucket_bytes=DEFAULT_BUCKET_BYTES):
        """A GradientBuckets summing `flat` over ranks during backward; None for one rank."""
        return None

    def broadcast_(self, buf, root=0):
        return buf

    def allgather_json(self, obj):
        """Every rank's small JSON-able object, as a list in rank order."""
        return [obj]

    # ZeRO-1 (zero.py): the flat buffers cut into one slice per rank, `counts` long each

    def reduce_scatter_sum(self, flat, counts):
        """This rank's slice of the sum over ranks of `flat` (a new array, or a view)."""
        return flat

    def allgather_slices_(self, flat, counts):
        """Every rank's slice of `flat`, from the rank that owns it, in place."""
        return flat

    def gather_slices(self, local, counts):
        """The slices of all ranks, joined, on rank 0 (None on the others)."""
        return local

    def pin_device(self, xp):
        """Make this rank's GPU (local_rank modulo the GPUs here) the current one."""
        if xp is not np:
            use_gpu(self.local_rank % xp.cuda.runtime.getDeviceCount())

    def abort(self, code=1, message=None):
        if message:
            sys.stderr.write(message.rstrip("\n") + "\n")
        sys.exit(code)


class MPIDistributed(Single):
    def __init__(self, comm, MPI, env=None):
        self.comm, self.MPI = comm, MPI
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.env = os.environ if env is None else env
        self._gpu_transport = None
        self.watch = CollectiveWatch()
        install_abort_on_error(comm, self.rank)

    def _watched(self, name, buf=None):
        """The watch's context for one collective; an asynchronous (NCCL) one on `buf`
        stays open until the GPU has run it (the transport's completion event)."""
        completion = None
        if buf is not None and array_module(buf) is not np:
            completion = getattr(self.gpu_transport(array_module(buf)), "completion", None)
        return self.watch.collective(name, completion)

    def barrier(self):
        with self._watched("barrier"):
            self.comm.Barrier()

    def allreduce_sum_(self, buf):
        with self._watched("allreduce", buf):
            self.transport_for(buf).allreduce_sum_(buf)
        return buf

    def allreduce_mean_(self, buf):
        self.allreduce_sum_(buf)
        buf /= self.world_size
        return buf

    def transport_for(self, buf):
        """What reduces `buf`: MPI on the host for NumPy, the GPU transport for CuPy."""
        xp = array_module(buf)
        return HostMPITransport(self.comm, self.MPI) if xp is np else self.gpu_transport(xp)

    def gradient_buckets(self, flat, bucket_bytes=DEFAULT_BUCKET_BYTES):
        transport = self.transport_for(flat)
        if not transport.overlaps:
            bucket_bytes = 0  # one allreduce after backward: see the transport for why
        return GradientBuckets(flat, bucket_bytes, transport, self.watch)

    def allreduce_scalars(self, values, op="sum", name=None):
        buf = np.array(values, dtype=np.float64)
        with self._watched(name or f"allreduce of {buf.size} number(s)"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if op == "mean":
            buf /= self.world_size
        return [float(v) for v in buf]

    def broadcast_(self, buf, root=0):
        with self._watched(f"broadcast from rank {root}", buf):
            if array_module(buf) is np:
                self.comm.Bcast(buf, root=root)
            else:
                self.gpu_transport(array_module(buf)).broadcast_(buf, root)
        return buf

    def _gpu_path(self, buf):
        """(xp, the NCCL transport or None) for a GPU buffer; (numpy, None) on the host."""
        xp = array_module(buf)
        if xp is np:
            return xp, None
        transport = self.gpu_transport(xp)
        return xp, transport if isinstance(transport, NCCLTransport) else None

    def reduce_scatter_sum(self, flat, counts):
        with self._watched("gradient reduce-scatter", flat):
            return self._reduce_scatter_sum(flat, counts)

    def _reduce_scatter_sum(self, flat, counts):
        xp, nccl = self._gpu_path(flat)
        if nccl is not None:
            return nccl.reduce_scatter_sum(flat, counts, self.rank)
        if xp is not np:  # another GPU transport: through the host
            return xp.asarray(self._reduce_scatter_sum(to_host(flat), counts))
        mine = np.empty(counts[self.rank], dtype=flat.dtype)
        self.comm.Reduce_scatter(flat, mine, recvcounts=list(counts), op=self.MPI.SUM)
        return mine

    def allgather_slices_(self, flat, counts):
        with self._watched("parameter allgather", flat):
            return self._allgather_slices_(flat, counts)

    def _allgather_slices_(self, flat, counts):
        xp, nccl = self._gpu_path(flat)
        if nccl is not None:
            return nccl.allgather_slices_(flat, counts, self.rank)
        if xp is not np:  # another GPU transport: through the host
            flat[...] = xp.asarray(self._allgather_slices_(to_host(flat), counts))
            return flat
        self.comm.Allgatherv(self.MPI.IN_PLACE, [flat, (list(counts), slice_offsets(counts))])
        return flat

    def gather_slices(self, local, counts):
        local = to_host(local)  # checkpoints only: through the host, whatever the transport
        whole = np.empty(sum(counts), dtype=local.dtype) if self.is_master else None
        with self._watched("gather to rank 0"):
            self.comm.Gatherv(local, [whole, (list(counts), slice_offsets(counts))] if self.is_master else None,
                              root=0)
        return whole

    def allgather_json(self, obj):
        """Pickle-free gather of small objects: JSON bytes through Allgatherv."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        sizes = np.zeros(self.world_size, dtype=np.int64)
        with self._watched("allgather"):
            self.comm.Allgather(np.array([data.size], dtype=np.int64), sizes)
            gathered = np.empty(int(sizes.sum()), dtype=np.uint8)
            self.comm.Allgatherv(data, [gathered, sizes.tolist()])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [json.loads(gathered[a:b].tobytes()) for a, b in zip(offsets[:-1], offsets[1:])]

    def gpu_transport(self, cupy):
        if self._gpu_transport is None:
            choice = choose_gpu_transport(
                nccl_available=nccl_available(cupy),
                cuda_aware=mpi_cuda_aware(self.MPI),
                override=self.env.get(TRANSPORT_ENV),
            )
            self._gpu_transport = make_gpu_transport(choice, self.comm, self.MPI, cupy)
        return self._gpu_transport

    def abort(self, code=1, message=None):
        """Print `message` (if any) and stop every rank of the job with exit `code`."""
        abort_with_message(self.comm, code, message)


def slice_offsets(counts):
    return [sum(counts[:r]) for r in range(len(counts))]


def pad_slices(flat, counts, xp=np):
    """flat cut into len(counts) slices, each padded to the longest: (ranks * S,) with
    rank r's slice at r * S. NCCL's reduceScatter and allGather move equal counts."""
    S, offsets = max(counts), slice_offsets(counts)
    padded = xp.zeros(len(counts) * S, dtype=flat.dtype)
    for r, (o, c) in enumerate(zip(offsets, counts)):
        padded[r * S : r * S + c] = flat[o : o + c]
    return padded


def unpad_slices_(flat, padded, counts):
    """The inverse of pad_slices, into flat (in place)."""
    S, offsets = max(counts), slice_offsets(counts)
    for r, (o, c) in enumerate(zip(offsets, counts)):
        flat[o : o + c] = padded[r * S : r * S + c]
    return flat


def report_failure(dist, message, everywhere=False, speaker=False):
    """One `error:` line for the job, then exit status 1 on every rank.

    everywhere: every rank has this same error (decided together, e.g. after an
    allgather): rank 0 prints it and each rank returns 1. Otherwise the ranks most
    often fail alike (the same flags, the same files), but one may fail alone while
    the others wait in a collective: rank 0 prints and aborts the job at once;
    another rank waits a moment first, so it speaks only when rank 0 did not fail.
    speaker: this rank was chosen to speak for the job (the watchdog's): it prints
    `error:` and aborts at once, whatever its rank.
    Returns 1 (when it returns at all)."""
    if dist.world_size == 1 or everywhere:
        if dist.is_master:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    if not (dist.is_master or speaker):
        time.sleep(4 * ABORT_GRACE_SECONDS)  # rank 0's abort, if it failed too, ends this rank first
    dist.abort(1, f"error: {message}" if dist.is_master or speaker else f"error on rank {dist.rank}: {message}")
    return 1


def install_abort_on_error(comm, rank):
    """An uncaught exception on any rank prints which rank failed and why, then
    aborts the whole job, so the other ranks never hang in a collective."""

    def excepthook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        abort_with_message(comm, 1, f"\n[rank {rank}] failed with {exc_type.__name__}: {exc}\n{text}"
                                    f"[rank {rank}] aborting all ranks")

    sys.excepthook = excepthook


def abort_with_message(comm, code, message=None):
    if message:
        sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_SECONDS)
    comm.Abort(code)


# ---- gradient buckets: the allreduce overlapped with backward --------------------------


class GradientBuckets:
    """Sum the flat gradient buffer over ranks while backward is still running.

    Backward finishes gradients from the END of the flat buffer toward its start:
    the head's ln_f first, then block L-1, ..., block 0, and the embeddings last
    (wte also takes the tied lm_head's gradient, so it is final only at the very
    end). So at any moment "everything from `offset` on is final" describes what is
    done, and GPT.backward(grads_final=buckets.ready) reports that offset after each
    block. Once the final part not yet sent, flat[offset:sent], holds `bucket_bytes`
    or more, it goes out as one allreduce that runs under the layers still to come.
    finish() sends the rest and waits for all of them: then `flat` holds the SUM
    over ranks (the caller divides).

    Bigger buckets cost fewer, more efficient collectives but start later and
    leave a longer tail after backward; bucket_bytes=0 sends one allreduce of the
    whole buffer in finish(), the no-overlap baseline.

    The transport provides start_allreduce_sum_(view) -> handle (which must not
    block when the transport says it overlaps) and wait_all(handles); an
    overlapping one also completion() -> done(), for the watchdog (see
    NCCLTransport).
    """

    def __init__(self, flat, bucket_bytes, transport, watch=None):
        self.flat, self.transport = flat, transport
        self.watch = watch or CollectiveWatch()
        self.bucket_elems = bucket_bytes // flat.dtype.itemsize if bucket_bytes > 0 else None
        self.sent_from = flat.size  # flat[sent_from:] has been sent
        self.handles, self.spans = [], []  # spans: (start, stop) of each allreduce, for tests

    def ready(self, offset):
        """flat[offset:] is final for this backward."""
        if self.bucket_elems is not None and self.sent_from - offset >= self.bucket_elems:
            self._send(offset)

    def _send(self, offset):
        whole = offset == 0 and self.sent_from == self.flat.size
        view = self.flat if whole else self.flat[offset:self.sent_from]
        with self.watch.collective("gradient allreduce", getattr(self.transport, "completion", None)):
            self.handles.append(self.transport.start_allreduce_sum_(view))
        self.spans.append((offset, self.sent_from))
        self.sent_from = offset

    def finish(self):
        """Send what is left (backward is over: all of it is final) and wait."""
        if self.sent_from > 0:
            self._send(0)
        self.transport.wait_all(self.handles)
        self.handles = []
        # NCCL: an event after backward's last kernel, before the wait for the sums (stragglers)
        self.compute_done = getattr(self.transport, "compute_done", None)
        return self.flat


class OneReduceAfterBackward:
    """For transports that block: a bucket sent during backward would stall it (a
    device-to-host copy or a stream synchronisation per bucket), so they do not
    overlap and GradientBuckets sends the whole buffer once, in finish()."""

    overlaps = False

    def start_allreduce_sum_(self, buf):
        self.allreduce_sum_(buf)

    def wait_all(self, handles):
        pass


class HostMPITransport(OneReduceAfterBackward):
    """NumPy buffers: mpi4py's in-place buffer Allreduce.

    No buckets on the CPU either: MPICH advances a nonblocking collective only
    inside MPI calls, so buckets sent as Iallreduce during backward mostly moved
    after it anyway, as several smaller collectives. Measured for 124M on 2 ranks
    (bench.py --ranks 2, twice each, alternating): step 9747 / 9942 ms with 25 MiB
    buckets against 9737 / 9699 ms with one allreduce, and 256 / 235 ms of exposed
    allreduce against 248 / 183 ms.
    """

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI

    def allreduce_sum_(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)


# ---- GPU gradient transports ------------------------------------------------------------


def choose_gpu_transport(nccl_available, cuda_aware, override=None):
    """Which transport reduces CuPy buffers: the override if given, else NCCL,
    else CUDA-aware MPI, else host staging."""
    if override:
        if override not in TRANSPORTS:
            raise ValueError(f"{TRANSPORT_ENV}={override!r}; choose one of {', '.join(TRANSPORTS)}")
        if override == "nccl" and not nccl_available:
            raise RuntimeError(f"{TRANSPORT_ENV}=nccl, but cupy.cuda.nccl is not available; "
                               "install NCCL for CuPy (`pip install nvidia-nccl-cu12`) or pick another")
        if override == "cuda-aware-mpi" and not cuda_aware:
            raise RuntimeError(f"{TRANSPORT_ENV}=cuda-aware-mpi, but this MPI library is not "
                               "CUDA-aware (MPIX_Query_cuda_support() == 0)")
        return override
    if nccl_available:
        return "nccl"
    if cuda_aware:
        return "cuda-aware-mpi"
    return "host"


def import_nccl(cupy):
    """CuPy's NCCL binding (cupy.cuda.nccl), which is imported on its own."""
    return importlib.import_module(cupy.__name__ + ".cuda.nccl")


def nccl_available(cupy):
    try:
        return bool(getattr(import_nccl(cupy), "available", True))
    except Exception:  # NCCL libraries missing or broken: fall back, don't fail
        return False


def mpi_cuda_aware(MPI):
    """Whether the MPI library accepts device pointers (MPIX_Query_cuda_support,
    an extension both Open MPI and MPICH provide; absent means no)."""
    query = getattr(MPI, "Query_cuda_support", None)  # newer mpi4py exposes it
    if query is not None:
        return bool(query())
    try:
        fn = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (AttributeError, OSError, TypeError):
        return False
    fn.restype = ctypes.c_int
    return bool(fn())


def make_gpu_transport(choice, comm, MPI, cupy):
    if choice == "nccl":
        return NCCLTransport(comm, cupy)
    if choice == "cuda-aware-mpi":
        return CudaAwareMPITransport(comm, MPI, cupy)
    return HostStagingTransport(comm, MPI, cupy)


class HostStagingTransport(OneReduceAfterBackward):
    """Device -> host copy, MPI allreduce on the host, host -> device copy."""

    name = "host"

    def __init__(self, comm, MPI, cupy):
        self.comm, self.MPI, self.cupy = comm, MPI, cupy

    def allreduce_sum_(self, buf):
        host = self.cupy.asnumpy(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        buf.set(host)

    def broadcast_(self, buf, root):
        host = self.cupy.asnumpy(buf)
        self.comm.Bcast(host, root=root)
        buf.set(host)


class CudaAwareMPITransport(OneReduceAfterBackward):
    """MPI reads and writes device memory directly (mpi4py takes CuPy arrays
    through __cuda_array_interface__). MPI knows nothing of CUDA streams, so the
    stream that produced the buffer is synchronised first."""

    name = "cuda-aware-mpi"

    def __init__(self, comm, MPI, cupy):
        self.comm, self.MPI, self.cupy = comm, MPI, cupy

    def allreduce_sum_(self, buf):
        self.cupy.cuda.get_current_stream().synchronize()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def broadcast_(self, buf, root):
        self.cupy.cuda.get_current_stream().synchronize()
        self.comm.Bcast(buf, root=root)


class NCCLTransport:
    """NCCL collectives on the current CUDA stream. Rank 0 makes the NCCL unique
    id and MPI broadcasts it, so every rank joins the same NCCL communicator."""

    name = "nccl"

    UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)

    def __init__(self, comm, cupy):
        self.nccl, self.cupy = import_nccl(cupy), cupy
        # the id as rank 0 made it, sent as numbers: [is it bytes?, 128 byte values]
        uid = np.zeros(1 + self.UNIQUE_ID_BYTES, dtype=np.int64)
        if comm.Get_rank() == 0:
            uid[:] = self._id_to_numbers(self.nccl.get_unique_id())
        comm.Bcast(uid, root=0)
        self.comm = self.nccl.NcclCommunicator(comm.Get_size(), self._id_from_numbers(uid), comm.Get_rank())
        self._comm_stream = None  # the side stream of overlapped buckets, made on first use
        self._last_stream = None  # where the last collective was queued (for completion())
        self.compute_done = None  # the event wait_all recorded after backward

    @staticmethod
    def _id_to_numbers(unique_id):
        """CuPy's get_unique_id() gives a tuple of 128 signed byte values in some
        versions and 128 raw bytes in others (CuPy 14.2 on an H200: bytes)."""
        if isinstance(unique_id, (bytes, bytearray)):
            return [1] + list(unique_id)
        return [0] + list(unique_id)

    @staticmethod
    def _id_from_numbers(numbers):
        """The id back in the form get_unique_id() returned it."""
        values = numbers[1:]
        if numbers[0]:
            return bytes(values.astype(np.uint8))
        return tuple(values.tolist())

    def _dtype(self, buf):
        names = {np.dtype(np.float32): "NCCL_FLOAT32", np.dtype(np.float64): "NCCL_FLOAT64",
                 np.dtype(np.float16): "NCCL_FLOAT16"}
        name = names.get(np.dtype(buf.dtype), "NCCL_BFLOAT16" if buf.dtype.itemsize == 2 else None)
        if name is None or not hasattr(self.nccl, name):
            raise TypeError(f"NCCL transport cannot reduce dtype {buf.dtype}")
        return getattr(self.nccl, name)

    def _stream(self):
        """The current stream's pointer, remembered as where the next collective runs."""
        self._last_stream = self.cupy.cuda.get_current_stream()
        return self._last_stream.ptr

    def completion(self):
        """done() -> whether the GPU has run the collective just queued: an event
        recorded behind it on its stream, which the watchdog thread polls (NCCL
        calls return at once; a rank that never joins leaves the kernel spinning)."""
        event = self._last_stream.record()
        return lambda: event.done

    def allreduce_sum_(self, buf):
        stream = self._stream()
        self.comm.allReduce(data_pointer(buf), data_pointer(buf), buf.size, self._dtype(buf), self.nccl.NCCL_SUM, stream)

    # Overlapped buckets. The compute stream goes on with backward while a second
    # stream runs the allreduces. Each bucket's allreduce waits (on the GPU, not the
    # host) for an event recorded on the compute stream after the bucket's last
    # gradient kernel; wait_all makes the compute stream wait for the side stream
    # before anything (clip, AdamW) reads the sums. The host never blocks.
    overlaps = True

    def _side_stream(self):
        if self._comm_stream is None:
            self._comm_stream = self.cupy.cuda.Stream(non_blocking=True)
        return self._comm_stream

    def start_allreduce_sum_(self, buf):
        side = self._last_stream = self._side_stream()
        side.wait_event(self.cupy.cuda.get_current_stream().record())
        self.comm.allReduce(data_pointer(buf), data_pointer(buf), buf.size, self._dtype(buf), self.nccl.NCCL_SUM, side.ptr)

    def wait_all(self, handles):
        if self._comm_stream is not None:
            compute = self.cupy.cuda.get_current_stream()
            self.compute_done = compute.record()  # this rank's own work ends here; then it waits for the others
            compute.wait_event(self._comm_stream.record())

    def broadcast_(self, buf, root):
        stream = self._stream()
        self.comm.bcast(data_pointer(buf), buf.size, self._dtype(buf), root, stream)

    # ZeRO-1 (zero.py): equal counts per rank, so uneven slices travel padded

    def reduce_scatter_sum(self, flat, counts, rank):
        S = max(counts)
        padded = pad_slices(flat, counts, self.cupy)
        mine = self.cupy.empty(S, dtype=flat.dtype)
        stream = self._stream()
        self.comm.reduceScatter(data_pointer(padded), data_pointer(mine), S, self._dtype(flat), self.nccl.NCCL_SUM,
                                stream)
        return mine[: counts[rank]]

    def allgather_slices_(self, flat, counts, rank):
        S, offset = max(counts), slice_offsets(counts)[rank]
        mine = self.cupy.zeros(S, dtype=flat.dtype)
        mine[: counts[rank]] = flat[offset : offset + counts[rank]]
        gathered = self.cupy.empty(S * len(counts), dtype=flat.dtype)
        stream = self._stream()
        self.comm.allGather(data_pointer(mine), data_pointer(gathered), S, self._dtype(flat), stream)
        return unpad_slices_(flat, gathered, counts)
