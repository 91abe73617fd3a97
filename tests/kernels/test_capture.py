"""The GPU training step (kernels/graph.py) inside a CUDA-graph capture, on the CPU.

The stand-in CuPy (fake_cupy.py) raises on anything a capture cannot hold (a host
sync, a pool allocation, a host-to-device copy, CuPy's own kernels, cuBLAS's
setStream) and records kernel launches and gemms into a stand-in graph that later
replays them. So: the steady-state step must capture without raising (accumulation
1 and 2, with and without --recompute), and 3 replayed steps must equal 3 eager
steps bit for bit in float32 and bf16 (nothing per-step frozen into the graph)."""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, distributed
from nanogpt_np.backend import to_host
from nanogpt_np.kernels import gemm, loader
from nanogpt_np.optim import AdamW, cosine_lr
from nanogpt_np.resilience import StepGuard

CFG = GPTConfig(block_size=16, vocab_size=61, n_layer=1, n_head=1, n_embd=64)  # head size 64
B, T = 2, 8


@pytest.fixture
def capture_gpu(emulator_lib, monkeypatch):
    """The stand-in CuPy with capture, kernels in the emulator (recorded while capturing)
    and gemms through kernels/gemm.CublasRunner on a stand-in libcublas."""
    from tests.kernels import emulator, fake_cupy

    cupy = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(emulator.EmulatedCupyRunner, "lib_path", emulator_lib)
    previous = loader.use_runner(fake_cupy.capturing_runners(emulator.EmulatedCupyRunner()))
    lib = fake_cupy.FakeCublasLib()
    previous_gemm = gemm.use_runner(gemm.CublasRunner(lib=lib))
    cupy.cublas_lib = lib
    yield cupy
    loader.use_runner(previous)
    gemm.use_runner(previous_gemm)


class Batches:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        buf = self.rng.integers(0, CFG.vocab_size, B * T + 1)
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def run_steps(dtype, steps, accum=1, recompute=False, cuda_graphs=True):
    from nanogpt_np.kernels.graph import GpuTrainStep

    model = GPT(CFG, dtype=dtype, seed=1, backend="cupy")
    model.recompute = recompute
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    lines = []
    step = GpuTrainStep(model, opt, accum, 1.0, distributed.Single(), cuda_graphs=cuda_graphs, log=lines.append)
    batches, guard, losses = Batches(), StepGuard(), []
    for i in range(steps):
        loss, norm, skipped, _ = step(batches, cosine_lr(i, 1e-3, 1e-4, 2, steps), guard)
        assert skipped is None
        losses.append((loss, norm))
    return losses, to_host(model.flat_params), step, lines


@pytest.mark.parametrize("accum, recompute", [(2, False), (1, True)])
def test_steady_state_step_is_captured_whole(capture_gpu, accum, recompute):
    _, _, step, lines = run_steps("float32", 3, accum, recompute)  # accumulation 1: the test below
    assert lines == [] and step.mode == "graphs"
    variants = {(True, True)} if accum == 1 else {(True, False), (False, True)}
    assert set(step.graphs) == variants | {"adamw"}
    assert step.memory.mismatch is None and step.memory.sequence  # the micro-step's arrays, replayed
    lib = capture_gpu.cublas_lib  # the project's own cuBLAS handle: one, a workspace, its stream set once
    assert lib.handles == 1 and lib.workspace_set and len(lib.streams_set) <= 2


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_replayed_graphs_equal_eager_steps(capture_gpu, dtype):
    eager_losses, eager_params, eager, _ = run_steps(dtype, 5, cuda_graphs=False)
    graph_losses, graph_params, graphed, lines = run_steps(dtype, 5)
    assert eager.mode == "eager" and graphed.mode == "graphs" and lines == []
    assert set(graphed.graphs) == {(True, True), "adamw"}
    assert graph_losses == eager_losses  # steps 3-5 replayed: new batches, new lr, same bits
    assert np.array_equal(graph_params, eager_params)
    start = to_host(GPT(CFG, dtype=dtype, seed=1, backend="cupy").flat_params)
    assert np.abs(graph_params - start).min() > 0  # every parameter moved


def test_capture_mode_refuses_what_a_graph_cannot_hold(capture_gpu):
    from tests.kernels.fake_cupy import CaptureError

    cp = capture_gpu
    a = cp.zeros(4, dtype=np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    for action in (lambda: float(a[:1].reshape(())), lambda: a[:1].item(), lambda: a.get(), lambda: cp.asnumpy(a), lambda: cp.empty(3),
                   lambda: cp.asarray(np.ones(3)), lambda: a.set(np.ones(4)), lambda: a + 1,
                   lambda: stream.synchronize(), lambda: a.astype(np.float64)):
        stream.begin_capture()
        try:
            with pytest.raises(CaptureError):
                action()
        finally:
            stream.end_capture()
    float(a[0])  # outside a capture all of it is fine
