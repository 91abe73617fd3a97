"""gpu_check: check the CuPy backend on a GPU, in one command, and print a table.

    python scripts/gpu_check.py --text gpu_data/shakespeare.npy      # minutes on an H200 (not yet timed with the graph and recipe rows)
    python scripts/gpu_check.py --budget 200 --no-compile

Needs only this repository (run it as scripts/gpu_check.py, which wires in the
PyTorch reference, benchmarks/torch_twin.py) and a GPU machine's Python with NumPy, CuPy (14, with
ml_dtypes for bf16) and a CUDA build of PyTorch (PyTorch is the speed reference; the
package never imports it). Each section runs in its own Python process, so a CUDA
error that poisons one process (an illegal address is sticky) costs that section's
remaining rows and nothing else; a failing row prints its error and the others
still run. Sections, in the order they run:
  0. the environment, NVRTC compiling every kernel;
  1. every kernel against its NumPy layer on random inputs, odd T included: the max
     relative error max|gpu - ref| / max|ref| per row (float32 kernels against a
     float64 reference, float64 against float64, bf16 against float64 computed
     from the same bf16 inputs), the gemmEx wrapper and the fused kernels too;
  2. the whole model's loss, logits and every gradient, GPU against the NumPy
     backend, for a small config and for the GPT-2 124M shape at T=1024, in
     float64, float32 (and TF32) and bf16;
  3. 20 AdamW training steps on the GPU against the same steps in NumPy;
  4. speed of a 124M training step at B=16 (or the largest B that fits), T=1024:
     bf16 (the default) and float32+TF32, tokens/s, MFU against the card's dense
     bf16 peak, the host's time per step, peak GPU memory; build-nanogpt's PyTorch
     recipe (bf16 autocast, flash SDPA, fused AdamW) on the same card in the same
     run, eager and (last, within --budget) torch.compile, and the ratio;
     the same step with CUDA graphs and eagerly (losses and ms/step), and the time of
     each kernel of one eager step (CUDA events, the top 15);
  5. the attention kernels' time (float32, bf16) against PyTorch's SDPA at B=16,
     NH=12, T=1024, hs=64;
  6. 50 steps of the 124M model on real text in bf16 against the same 50 steps in
     float32: the loss curves must agree within 1%; and (after torch.compile's
     row, within --budget) the same work as the recipe it replaces: 50 bf16 steps
     from the same initial weights over the same batches of the text at the same
     learning rates, ours against build-nanogpt's loop under torch.compile: loss
     curves within 1% at every step, each side's wall time and the ratio
     (gpucheck/recipe.py).
  7. scripts/train.py --backend cupy itself, as a subprocess: validation, samples and
     checkpoints, then --resume from the middle checkpoint (the log must come out
     identical), the same run with --cuda-graphs off, then under `mpiexec -n 1` with NANOGPT_MPI=1 (the NCCL path);
  and, last, within --budget: the 350M preset's shape in bf16, ours against PyTorch
     eager and torch.compile (rows "350M ..." of section 4).
--counts: no GPU needed; one steady-state step counted on a stand-in (gpucheck/counts.py).
--text (or --data): token ids (.npy, e.g. made here by `--prepare-text FILE OUT.npy`, which
needs the GPT-2 tokenizer files) or a text file (GPT-2 BPE if the tokenizer is
installed, else UTF-8 bytes as tokens); without it, the bytes of this Python's
standard library sources. With $OUT set, the table also goes to $OUT/gpu_check.txt
and $OUT/gpu_check.json after every row.
"""
