"""The GPU tests (test_gpu.py), run on the CPU through a fake CuPy and the kernel
emulator, at sizes the emulator handles quickly. On a GPU machine test_gpu.py
runs for real; here this proves its own logic (and the CuPy branches of the
package) before that day."""
import numpy as np

from tests.kernels import test_gpu


def test_gpu_tests_on_a_fake_gpu(fake_gpu):
    cp = fake_gpu
    test_gpu.test_every_kernel_compiles_with_nvrtc_on_this_gpu(cp)
    for dtype in (np.float32, np.float64):
        test_gpu.test_attention_on_gpu(cp, 1, 70, 2, dtype)
        test_gpu.test_model_loss_and_grads_match_numpy(cp, dtype)
    test_gpu.test_layernorm_gelu_cross_entropy_on_gpu(cp, np.float32)
    test_gpu.test_training_steps_track_numpy(cp)
    test_gpu.test_checkpoints_move_between_gpu_and_cpu(cp)
    test_gpu.test_tf32_switch(cp)
