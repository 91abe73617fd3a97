"""distributed.py on one CPU process: launcher detection, the GPU transport choice,
and each transport's calls, with fake MPI, CuPy and NCCL modules injected."""
import sys
import types

import numpy as np
import pytest

from nanogpt_np import distributed as dist


def test_single_process_needs_no_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it would fail
    d = dist.init(env={})
    assert isinstance(d, dist.Single) and d.is_master and d.world_size == 1
    buf = np.arange(4.0)
    assert d.allreduce_mean_(buf) is buf and list(buf) == [0, 1, 2, 3]
    assert d.allreduce_scalars([1, 2.5]) == [1.0, 2.5]
    assert d.allgather_json({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize(
    "env,size",
    [({}, 1), ({"PMI_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2), ({"PMI_SIZE": ""}, 1)],
)
def test_launched_world_size(env, size):
    assert dist.launched_world_size(env) == size


@pytest.mark.parametrize(
    "nccl,aware,override,expected",
    [
        (True, True, None, "nccl"),
        (True, False, None, "nccl"),
        (False, True, None, "cuda-aware-mpi"),
        (False, False, None, "host"),
        (True, True, "host", "host"),
        (True, True, "cuda-aware-mpi", "cuda-aware-mpi"),
        (True, False, "nccl", "nccl"),
    ],
)
def test_gpu_transport_choice(nccl, aware, override, expected):
    assert dist.choose_gpu_transport(nccl, aware, override) == expected


def test_gpu_transport_override_errors():
    with pytest.raises(ValueError, match="choose one of nccl, cuda-aware-mpi, host"):
        dist.choose_gpu_transport(True, True, "gloo")
    with pytest.raises(RuntimeError, match="cupy.cuda.nccl is not available"):
        dist.choose_gpu_transport(False, True, "nccl")
    with pytest.raises(RuntimeError, match="not CUDA-aware"):
        dist.choose_gpu_transport(True, False, "cuda-aware-mpi")


def test_cuda_awareness_query():
    assert dist.mpi_cuda_aware(types.SimpleNamespace(Query_cuda_support=lambda: 1)) is True
    assert dist.mpi_cuda_aware(types.SimpleNamespace(Query_cuda_support=lambda: 0)) is False
    assert dist.mpi_cuda_aware(types.SimpleNamespace(__file__="/nonexistent/MPI.so")) is False


def test_cuda_awareness_of_the_installed_mpi():
    MPI = pytest.importorskip("mpi4py.MPI")
    # the pip `mpich` wheel is built without CUDA
    assert dist.mpi_cuda_aware(MPI) is False


# ---- fakes -------------------------------------------------------------------------------


class FakeDeviceArray:
    """Stands in for a cupy.ndarray: host memory, a device pointer, a .set()."""

    def __init__(self, values):
        self.host = np.array(values, dtype=np.float32)
        self.size, self.dtype = self.host.size, self.host.dtype
        self.data = types.SimpleNamespace(ptr=0xDEAD0000)

    def set(self, host):
        self.host[...] = host

    def __itruediv__(self, k):
        self.host /= k
        return self


class FakeComm:
    """Two ranks' worth of MPI: Allreduce doubles the buffer (both ranks hold the same)."""

    def __init__(self, rank=0, size=2, sent_id_was_bytes=0):
        self.rank, self.size, self.calls = rank, size, []
        self.sent_id_was_bytes = sent_id_was_bytes

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return types.SimpleNamespace(Get_rank=lambda: self.rank, Get_size=lambda: self.size, Free=lambda: None)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        target = recvbuf.host if isinstance(recvbuf, FakeDeviceArray) else recvbuf
        self.calls.append(("Allreduce", type(recvbuf).__name__))
        target *= self.size

    def Bcast(self, buf, root=0):
        self.calls.append(("Bcast", type(buf).__name__))
        if self.rank != root and isinstance(buf, np.ndarray) and buf.dtype == np.int64:
            buf[0], buf[1:] = self.sent_id_was_bytes, 7  # the id rank 0 sent

    def Abort(self, code):
        self.calls.append(("Abort", code))


def fake_mpi(cuda_aware):
    return types.SimpleNamespace(
        IN_PLACE="IN_PLACE", SUM="SUM", COMM_TYPE_SHARED=1, Query_cuda_support=lambda: int(cuda_aware)
    )


def fake_cupy(monkeypatch, nccl_available):
    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeDeviceArray
    syncs = []
    cupy.events = []  # ("record", stream ptr) / ("wait", waiting stream ptr, event's stream ptr), in order

    class Stream:
        made = 0

        def __init__(self, non_blocking=False, ptr=None):
            Stream.made += 1
            self.ptr = ptr if ptr is not None else 100 + Stream.made

        def synchronize(self):
            syncs.append(1)

        def record(self):
            cupy.events.append(("record", self.ptr))
            return types.SimpleNamespace(stream_ptr=self.ptr)

        def wait_event(self, event):
            cupy.events.append(("wait", self.ptr, event.stream_ptr))

    stream = Stream(ptr=42)
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream, Stream=Stream)
    cupy.asnumpy = lambda a: a.host.copy()
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = nccl_available
    nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 7, 8, 0
    nccl.get_unique_id = lambda: tuple(range(-64, 64))
    nccl.made = []

    class NcclCommunicator:
        def __init__(self, n, uid, rank):
            nccl.made.append((n, uid, rank))
            self.calls = []

        def allReduce(self, send, recv, count, dtype, op, stream_ptr):
            self.calls.append((send, recv, count, dtype, op, stream_ptr))

    nccl.NcclCommunicator = NcclCommunicator
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return cupy, nccl, syncs


@pytest.fixture
def no_excepthook_change(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


@pytest.mark.parametrize("nccl_ok,aware,expected", [(True, False, "nccl"), (False, True, "cuda-aware-mpi"),
                                                    (False, False, "host")])
def test_transport_selected_for_cupy_buffers(monkeypatch, no_excepthook_change, nccl_ok, aware, expected):
    cupy, nccl, syncs = fake_cupy(monkeypatch, nccl_ok)
    comm = FakeComm(rank=0)
    d = dist.MPIDistributed(comm, fake_mpi(aware), env={})
    buf = FakeDeviceArray([1.0, 2.0, 3.0])
    d.allreduce_mean_(buf)
    transport = d.gpu_transport(cupy)
    assert transport.name == expected
    if expected == "nccl":
        (n, uid, rank), = nccl.made
        assert (n, rank) == (2, 0) and uid == tuple(range(-64, 64))
        assert transport.comm.calls == [(0xDEAD0000, 0xDEAD0000, 3, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 42)]
        assert ("Bcast", "ndarray") in comm.calls  # the unique id went over MPI
    elif expected == "cuda-aware-mpi":
        assert comm.calls[-1] == ("Allreduce", "FakeDeviceArray") and syncs  # device buffer, after a sync
        np.testing.assert_allclose(buf.host, [1, 2, 3])  # summed over 2 equal ranks, then / 2
    else:
        assert comm.calls[-1] == ("Allreduce", "ndarray")  # staged through the host
        np.testing.assert_allclose(buf.host, [1, 2, 3])


def test_nccl_unique_id_comes_from_rank_0(monkeypatch, no_excepthook_change):
    cupy, nccl, _ = fake_cupy(monkeypatch, True)
    d = dist.MPIDistributed(FakeComm(rank=1), fake_mpi(False), env={})
    d.gpu_transport(cupy)
    (n, uid, rank), = nccl.made
    assert rank == 1 and uid == (7,) * 128  # what the Bcast delivered, not a local id


def test_nccl_unique_id_given_as_bytes_stays_bytes(monkeypatch, no_excepthook_change):
    """CuPy 14.2 (seen on an H200) returns the id as 128 raw bytes, not a tuple."""
    cupy, nccl, _ = fake_cupy(monkeypatch, True)
    raw = bytes(range(100, 228))
    nccl.get_unique_id = lambda: raw
    dist.MPIDistributed(FakeComm(rank=0), fake_mpi(False), env={}).gpu_transport(cupy)
    dist.MPIDistributed(FakeComm(rank=1, sent_id_was_bytes=1), fake_mpi(False), env={}).gpu_transport(cupy)
    (_, uid0, _), (_, uid1, _) = nccl.made
    assert uid0 == raw and uid1 == bytes([7] * 128)


def test_env_forces_host_staging(monkeypatch, no_excepthook_change):
    cupy, nccl, _ = fake_cupy(monkeypatch, True)
    d = dist.MPIDistributed(FakeComm(), fake_mpi(True), env={dist.TRANSPORT_ENV: "host"})
    assert d.gpu_transport(cupy).name == "host" and not nccl.made


def test_numpy_buffers_use_mpi_in_place(no_excepthook_change):
    comm = FakeComm()
    d = dist.MPIDistributed(comm, fake_mpi(False), env={})
    buf = np.array([2.0, 4.0])
    d.allreduce_mean_(buf)
    assert comm.calls == [("Allreduce", "ndarray")]
    np.testing.assert_allclose(buf, [2.0, 4.0])


def test_excepthook_names_the_rank_and_aborts(capsys, monkeypatch, no_excepthook_change):
    monkeypatch.setattr(dist, "ABORT_GRACE_SECONDS", 0)
    comm = FakeComm(rank=1)
    dist.MPIDistributed(comm, fake_mpi(False), env={})
    try:
        raise RuntimeError("shard missing")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert "[rank 1] failed with RuntimeError: shard missing" in capsys.readouterr().err
    assert comm.calls[-1] == ("Abort", 1)


# ---- gradient buckets (the allreduce overlapped with backward) --------------------------


class RecordingTransport:
    overlaps = True

    def __init__(self):
        self.started, self.waited = [], None

    def start_allreduce_sum_(self, view):
        self.started.append(view.size)
        view *= 2  # two equal ranks
        return len(self.started)

    def wait_all(self, handles):
        self.waited = list(handles)


@pytest.mark.parametrize("bucket_elems,spans", [
    (4, [(8, 12), (4, 8), (0, 4)]),  # a bucket as soon as 4 final elements wait
    (5, [(6, 12), (0, 6)]),  # a bucket can overshoot: offsets come a block at a time
    (100, [(0, 12)]),  # bigger than the buffer: all of it in finish()
    (0, [(0, 12)]),  # 0: no overlap, one allreduce after backward
])
def test_buckets_send_each_final_suffix_once(bucket_elems, spans):
    flat = np.arange(12, dtype=np.float32)
    transport = RecordingTransport()
    buckets = dist.GradientBuckets(flat, bucket_elems * flat.itemsize, transport)
    for offset in (10, 8, 6, 4, 2, 0):  # what a 5-block backward reports, block by block
        buckets.ready(offset)
    assert buckets.finish() is flat
    assert buckets.spans == spans
    assert transport.waited == list(range(1, len(spans) + 1))  # finish waits for every one
    np.testing.assert_array_equal(flat, np.arange(12) * 2)  # every element reduced exactly once


def test_training_on_the_cpu_sends_one_allreduce_after_backward(no_excepthook_change):
    comm = FakeComm()
    d = dist.MPIDistributed(comm, fake_mpi(False), env={})
    flat = np.ones(6)
    buckets = d.gradient_buckets(flat, bucket_bytes=8)
    buckets.ready(3)
    assert comm.calls == []  # no faster on the CPU: see HostMPITransport
    buckets.finish()
    assert comm.calls == [("Allreduce", "ndarray")] and buckets.spans == [(0, 6)]
    np.testing.assert_array_equal(flat, 2.0)  # the sum over 2 ranks; the caller divides


def test_single_process_has_no_buckets():
    assert dist.Single().gradient_buckets(np.zeros(3)) is None


def test_nccl_buckets_run_on_a_side_stream_ordered_by_events(monkeypatch, no_excepthook_change):
    cupy, nccl, syncs = fake_cupy(monkeypatch, True)
    d = dist.MPIDistributed(FakeComm(), fake_mpi(False), env={})
    views = []

    class View:  # flat[a:b] of a device array: an offset pointer and a size
        def __init__(self, start, stop):
            self.data = types.SimpleNamespace(ptr=0xDEAD0000 + 4 * start)
            self.size, self.dtype = stop - start, np.dtype(np.float32)
            views.append((start, stop))

    class Flat(FakeDeviceArray):
        def __getitem__(self, s):
            return View(s.start, s.stop)

    flat = Flat(np.zeros(8))
    buckets = d.gradient_buckets(flat, bucket_bytes=3 * 4)
    transport = d.gpu_transport(cupy)
    buckets.ready(4)
    buckets.ready(0)
    buckets.finish()
    side = transport._comm_stream.ptr
    assert side != 42 and not syncs  # a second stream, and the host never waits
    assert [c[2] for c in transport.comm.calls] == [4, 4] and {c[5] for c in transport.comm.calls} == {side}
    assert views == [(4, 8), (0, 4)] and transport.comm.calls[0][0] == 0xDEAD0000 + 16  # its own pointer
    # each allreduce waits (on the GPU) for the compute stream's work so far, and is
    # followed by an event on the side stream that the watchdog polls (its completion);
    # at the end the compute stream waits for the side stream before clip and AdamW read
    assert cupy.events == [("record", 42), ("wait", side, 42), ("record", 42), ("wait", side, 42),
                           ("record", 42), ("record", side), ("wait", 42, side)]
    assert buckets.compute_done.stream_ptr == 42  # after backward, before the wait: the rank's own GPU time


@pytest.mark.parametrize("override", ["host", "cuda-aware-mpi"])
def test_blocking_gpu_transports_reduce_once_after_backward(monkeypatch, no_excepthook_change, override):
    cupy, _, _ = fake_cupy(monkeypatch, False)
    comm = FakeComm()
    d = dist.MPIDistributed(comm, fake_mpi(True), env={dist.TRANSPORT_ENV: override})
    flat = FakeDeviceArray(np.ones(8))
    buckets = d.gradient_buckets(flat, bucket_bytes=4)
    buckets.ready(4)
    assert not comm.calls  # no blocking reduce in the middle of backward
    buckets.finish()
    assert len(comm.calls) == 1 and buckets.spans == [(0, 8)]
    np.testing.assert_array_equal(flat.host, 2.0)


def test_padded_slices_carry_uneven_shards_through_equal_count_collectives():
    """What NCCL's reduceScatter and allGather see under ZeRO-1, emulated for 3 ranks:
    each rank's flat buffer padded so every slice is as long as the longest."""
    from nanogpt_np.distributed import pad_slices, unpad_slices_
    from nanogpt_np.zero import shard_counts

    counts = shard_counts(11, 3)  # [4, 4, 3]
    S = max(counts)
    flats = [np.arange(11, dtype=np.float64) * (r + 1) for r in range(3)]
    summed = sum(pad_slices(f, counts) for f in flats)  # reduceScatter's sum, laid out padded
    total = sum(flats)
    offsets = [0, 4, 8]
    for r in range(3):
        np.testing.assert_array_equal(summed[r * S : r * S + counts[r]], total[offsets[r] : offsets[r] + counts[r]])
    # allGather: rank r contributes its padded slice of a buffer where only its slice is right
    truth = np.arange(11, dtype=np.float64) + 100
    gathered = np.concatenate([np.pad(truth[o : o + c], (0, S - c)) for o, c in zip(offsets, counts)])
    out = unpad_slices_(np.zeros(11), gathered, counts)
    np.testing.assert_array_equal(out, truth)
