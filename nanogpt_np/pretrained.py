"""GPT-2 weights in and out: Hugging Face checkpoints and llm.c model files.

Hugging Face (`transformers`' GPT2LMHeadModel) keeps a GPT-2 as two files in one
directory: config.json (n_layer, n_head, n_embd, n_positions, vocab_size, ...)
and model.safetensors. The tensor names are ours, with or without the leading
"transformer.", with two differences:
  - attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are OpenAI's "Conv1D", whose
    weight is stored (in, out); ours are (out, in), so they are transposed both ways;
  - older files also hold attn.bias and attn.masked_bias, the causal mask as a
    buffer, not a parameter: they are skipped.
lm_head.weight, when present, is the same matrix as wte (the weights are tied).

llm.c (github.com/karpathy/llm.c) keeps a model in one file: a header of 256
int32 values, then every parameter as raw little-endian floats in llm.c's order
(see LLMC_ORDER). Header: [0] magic 20240326, [1] version (3: float32, 5:
bfloat16), [2] max_seq_len, [3] vocab_size, [4] num_layers, [5] num_heads,
[6] channels, [7] padded_vocab_size. wte has padded_vocab_size rows, those past
vocab_size being zeros that no token ever uses.

GPT-2's tokenizer has 50257 tokens. Training pads the vocab to 50304 (a multiple
of 128, faster matmuls); the extra rows are never a target. Export cuts them off
for Hugging Face, and llm.c files carry both sizes.

Nothing here unpickles: safetensors and llm.c files are read as raw bytes.
"""
import json
import os
import urllib.request
from pathlib import Path

import numpy as np

from . import safetensors_io
from .jsonio import parse_json
from .backend import to_host
from .config import LM_HEAD, WPE, WTE, GPTConfig, parameter_shapes
from .model import GPT

GPT2_VOCAB = 50257  # tokens in GPT-2's tokenizer
HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
class HFWeightsError(ValueError):
    """A Hugging Face GPT-2 directory that cannot be loaded: config.json or the
    tensors it describes; the message names the file (and the key or tensor)."""


class LlmcModelError(ValueError):
    """An llm.c model file that cannot be loaded; the message names the file."""


WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")  # what a weight may be stored as: floating point
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
HF_BASE_URL = "https://huggingface.co"
HF_FILES = ("config.json", "model.safetensors")

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}
LLMC_HEADER_INTS = 256
# llm.c's parameter tensors in file order; "{}" is the layer, stacked over all layers
LLMC_ORDER = (
    ("wte", WTE), ("wpe", WPE),
    ("ln1w", "ln_1.weight"), ("ln1b", "ln_1.bias"),
    ("qkvw", "attn.c_attn.weight"), ("qkvb", "attn.c_attn.bias"),
    ("attprojw", "attn.c_proj.weight"), ("attprojb", "attn.c_proj.bias"),
    ("ln2w", "ln_2.weight"), ("ln2b", "ln_2.bias"),
    ("fcw", "mlp.c_fc.weight"), ("fcb", "mlp.c_fc.bias"),
    ("fcprojw", "mlp.c_proj.weight"), ("fcprojb", "mlp.c_proj.bias"),
    ("lnfw", "transformer.ln_f.weight"), ("lnfb", "transformer.ln_f.bias"),
)


def export_vocab_size(config):
    """The vocab a file outside this project should see: GPT-2's 50257 when the
    model's vocab is that padded up, else the model's own."""
    return GPT2_VOCAB if config.vocab_size >= GPT2_VOCAB else config.vocab_size


def resize_vocab(model, vocab_size):
    """A copy of `model` with wte cut to, or padded with zero rows up to, vocab_size.

    Cutting drops padding rows (say 50304 -> 50257) that no token uses; sampling a
    padded model's cut copy can then never produce an id the tokenizer lacks.
    """
    cfg = GPTConfig(**{**model.config.to_dict(), "vocab_size": vocab_size})
    out = GPT(cfg, dtype=model.dtype, backend=model.backend, init_weights=False)
    sd = {n: p for n, p in model.parameters().items() if n != WTE}
    wte = out.xp.zeros((vocab_size, cfg.n_embd), dtype=model.dtype)
    keep = min(vocab_size, model.config.vocab_size)
    wte[:keep] = model.params[WTE][:keep]
    sd[WTE] = wte
    out.load_state_dict(sd)
    return out


# ---- loading: which file ---------------------------------------------------------


def load(path_or_name, dtype=np.float32, backend="numpy", download=False, vocab_size=None,
         cache_dir=None, base_url=HF_BASE_URL):
    """A GPT from a Hugging Face directory or model name, or from an llm.c .bin file.

    path_or_name: a directory holding config.json and model.safetensors; an llm.c
      model file; or a Hugging Face name ("gpt2", "gpt2-medium", "gpt2-large",
      "gpt2-xl", or any "owner/name"), looked up in the local Hugging Face cache
      ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) and in
      nanogpt_np's own cache, and downloaded into the latter when download=True.
    vocab_size: pad (or cut) wte to this many rows, e.g. 50304 to fine-tune; by
      default the file's own size (llm.c files: the padded size).
    """
    path = Path(os.path.expanduser(str(path_or_name)))
    if path.is_file() and path.suffix == ".safetensors":
        model = load_hf(path.parent, dtype=dtype, backend=backend)  # the file's directory has config.json
    elif path.is_file():
        model = load_llmc(path, dtype=dtype, backend=backend)
    else:
        directory = resolve_hf(path_or_name, download=download, cache_dir=cache_dir, base_url=base_url)
        model = load_hf(directory, dtype=dtype, backend=backend)
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        model = resize_vocab(model, vocab_size)
    return model


def hf_cache_roots():
    """Where huggingface_hub keeps downloads, in its own order of precedence."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return [Path(env["HF_HUB_CACHE"])]
    if env.get("HUGGINGFACE_HUB_CACHE"):  # the older name of the same setting
        return [Path(env["HUGGINGFACE_HUB_CACHE"])]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]) / "hub"]
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(xdg) / "huggingface" / "hub"]


def own_cache_dir():
    """nanogpt_np's download cache: $NANOGPT_NP_CACHE, else ~/.cache/nanogpt_np."""
    if os.environ.get("NANOGPT_NP_CACHE"):
        return Path(os.environ["NANOGPT_NP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "nanogpt_np"


def _repo_ids(name):
    # The GPT-2 repos moved to "openai-community/"; the short names still resolve.
    return [name] if "/" in name else [name, f"openai-community/{name}"]


def _has_weights(d):
    return (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()


def find_in_hf_cache(name, roots=None):
    """The snapshot directory of `name` in the Hugging Face cache holding both files, or None.

    The cache keeps models--{owner}--{name}/snapshots/{commit}/ (files are links
    into blobs/), and refs/main names the commit that "main" pointed to.
    """
    for root in roots or hf_cache_roots():
        for repo in _repo_ids(name):
            repo_dir = root / ("models--" + repo.replace("/", "--"))
            snapshots = repo_dir / "snapshots"
            if not snapshots.is_dir():
                continue
            candidates = []
            ref = repo_dir / "refs" / "main"
            if ref.is_file():
                candidates.append(snapshots / ref.read_text().strip())
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            for snap in candidates:
                if snap.is_dir() and (snap / "config.json").is_file() and _has_weights(snap):
                    return snap
    return None


def resolve_hf(path_or_name, download=False, cache_dir=None, base_url=HF_BASE_URL):
    """The directory holding config.json and model.safetensors for a path or a name."""
    text = str(path_or_name)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        _check_hf_dir(path)
        return path
    looks_like_a_file = path.suffix in (".bin", ".safetensors", ".json")
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or looks_like_a_file:
        raise FileNotFoundError(
            f"{text}: no such directory or file. Give a directory with config.json and "
            "model.safetensors, an llm.c model file, or a model name such as 'gpt2'"
        )
    found = find_in_hf_cache(text)
    if found is not None:
        return found
    own = Path(cache_dir) if cache_dir is not None else own_cache_dir() / "models"
    local = own / text.replace("/", "--")
    if local.is_dir() and (local / "config.json").is_file() and _has_weights(local):
        return local
    if download:
        return download_hf(text, local, base_url=base_url)
    searched = ", ".join(str(r) for r in hf_cache_roots())
    stale = _only_pickles_hint(text)
    raise FileNotFoundError(
        f"GPT-2 weights {text!r} not found: searched the Hugging Face cache ({searched}) and {local}. "
        f"{stale}Get them with `huggingface-cli download {text} config.json model.safetensors`, "
        "or call from_pretrained(..., download=True) (scripts download by themselves), "
        "or pass a directory holding config.json and model.safetensors"
    )


def _only_pickles_hint(name):
    for root in hf_cache_roots():
        for repo in _repo_ids(name):
            for snap in (root / ("models--" + repo.replace("/", "--")) / "snapshots").glob("*"):
                if (snap / "pytorch_model.bin").exists():
                    return (
                        f"The cache at {snap} holds only pytorch_model.bin, a pickle, which nanogpt_np "
                        "never loads; download model.safetensors. "
                    )
    return ""


def _check_hf_dir(directory):
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json. A Hugging Face GPT-2 directory holds config.json and "
            "model.safetensors (GPT.save_pretrained and transformers' save_pretrained write both)"
        )
    if not _has_weights(directory):
        pickle = " It holds pytorch_model.bin, a pickle, which nanogpt_np never loads." if (
            directory / "pytorch_model.bin").exists() else ""
        raise FileNotFoundError(
            f"{directory} has no model.safetensors.{pickle} Save the model with "
            "save_pretrained(dir, safe_serialization=True), or download model.safetensors "
            "(`huggingface-cli download gpt2 model.safetensors config.json`)"
        )


def download_hf(name, directory, base_url=HF_BASE_URL):
    """Fetch config.json and model.safetensors of Hugging Face model `name` into directory.

    Each file is written to a temporary name and renamed when complete, so an
    interrupted download never leaves a half file that looks whole.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for filename in HF_FILES:
        target = directory / filename
        if target.is_file():
            continue
        url = f"{base_url.rstrip('/')}/{name}/resolve/main/{filename}"
        print(f"downloading {url} -> {target}", flush=True)
        try:
            download_file(url, target)
        except OSError as e:
            raise RuntimeError(
                f"could not download {url} ({e}). Without a network, copy config.json and "
                f"model.safetensors of {name!r} into a directory and pass that directory"
            ) from e
    return directory


def download_file(url, target, chunk=1 << 22):
    """url -> target, atomically; any urllib error comes out as an OSError."""
    with urllib.request.urlopen(url, timeout=60) as response, safetensors_io.atomic_open(target) as f:
        while True:
            block = response.read(chunk)
            if not block:
                break
            f.write(block)


# ---- Hugging Face format -----------------------------------------------------------


def read_config_json(path):
    """config.json as a dict, or HFWeightsError naming the file and what is wrong."""
    cfg = parse_json(Path(path).read_bytes(), str(path), HFWeightsError)
    if not isinstance(cfg, dict):
        raise HFWeightsError(f"{path}: a config must be a JSON object, not a {type(cfg).__name__}")
    return cfg


def _config_from_hf(cfg, where):
    """GPTConfig from a config.json dict, refusing variants this model does not compute."""
    def need(key, alt=None):
        for k in (key, alt):
            if k is not None and k in cfg:
                value = cfg[k]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise HFWeightsError(f"{where}: {k} is {value!r}; a GPT-2 size must be a positive integer")
                return value
        raise HFWeightsError(f"{where}: config.json lacks {key!r}; it does not describe a GPT-2")

    if cfg.get("model_type", "gpt2") != "gpt2":
        raise HFWeightsError(f"{where}: model_type is {cfg['model_type']!r}; only GPT-2 ('gpt2') loads here")
    n_embd = need("n_embd", "hidden_size")
    unsupported = []
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={cfg['activation_function']!r} (this model uses tanh GELU)")
    if abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={cfg['layer_norm_epsilon']} (this model uses 1e-5)")
    if cfg.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={cfg['n_inner']} (this model uses 4 * n_embd)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("a non-standard attention scaling")
    if not cfg.get("tie_word_embeddings", True):
        unsupported.append("untied lm_head and wte")
    if unsupported:
        raise HFWeightsError(f"{where}: this GPT-2 variant is not supported: " + "; ".join(unsupported))
    n_head = need("n_head", "num_attention_heads")
    if n_embd % n_head:
        raise HFWeightsError(f"{where}: n_embd {n_embd} is not divisible by n_head {n_head}, so it describes no "
                             "GPT-2 (each head takes n_embd / n_head channels); the file is corrupt or edited")
    return GPTConfig(block_size=need("n_positions", "n_ctx"), vocab_size=need("vocab_size"),
                     n_layer=need("n_layer", "num_hidden_layers"), n_head=n_head, n_embd=n_embd)


def _check_sizes_against_tensors(config, tensors, config_path, source):
    """The config's sizes against the tensors actually in the file, in time linear in
    the file (a config claiming 10^9 layers is refused before anything is built), and
    the block indices contiguous from 0."""
    blocks = set()
    for name in tensors:
        parts = name.removeprefix("transformer.").split(".")
        if parts[0] == "h" and len(parts) > 1 and parts[1].isdigit():
            blocks.add(int(parts[1]))
    # distinct indices >= 0, as many as n_layer, the largest n_layer - 1: exactly 0..n_layer-1
    if len(blocks) != config.n_layer or max(blocks, default=-1) != config.n_layer - 1:
        held = f"blocks {min(blocks)}..{max(blocks)} ({len(blocks)} in all)" if blocks else "no blocks"
        raise HFWeightsError(f"{config_path} says n_layer={config.n_layer}, but {source} holds {held}; the two "
                             "files do not belong together (re-download or re-export the checkpoint)")


def _read_hf_tensors(directory):
    """{name: array} from model.safetensors, or from the shards its index lists."""
    single = directory / "model.safetensors"
    if single.is_file():
        return _load_weights(single), str(single)
    index_path = directory / "model.safetensors.index.json"
    index = read_config_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFWeightsError(f"{index_path}: no weight_map of tensor names to shard files")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (directory / shard).is_file():
            raise HFWeightsError(f"{index_path} lists shard {shard!r}, which is not a file in {directory}")
        tensors.update(_load_weights(directory / shard))
    return tensors, str(index_path)


def _load_weights(path):
    """A safetensors file's tensors, after checking from its header (read and validated
    first, see safetensors_io.read_header) that every weight is floating point: an
    integer or boolean tensor cast to float would load without a word, and wrong."""
    header, _, _ = safetensors_io.read_header(path)
    for name, info in header.items():
        if info["dtype"] not in WEIGHT_DTYPES and not name.endswith(MASK_BUFFERS):
            raise HFWeightsError(f"{path}: tensor {name} is stored as {info['dtype']}; weights must be "
                                 f"floating point ({', '.join(WEIGHT_DTYPES)})")
    return safetensors_io.load(path)


def load_hf(directory, dtype=np.float32, backend="numpy"):
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    directory = Path(directory)
    _check_hf_dir(directory)
    config_path = directory / "config.json"
    config = _config_from_hf(read_config_json(config_path), config_path)
    tensors, source = _read_hf_tensors(directory)
    _check_sizes_against_tensors(config, tensors, config_path, source)
    # Strip the optional prefix once: "transformer.h.0..." and "h.0..." name the same tensor.
    stripped = {}
    for name, value in tensors.items():
        if name.endswith(MASK_BUFFERS):
            continue  # the causal mask buffers, not parameters
        key = name if name == LM_HEAD else name.removeprefix("transformer.")
        stripped[key] = value
    expected = parameter_shapes(config)
    missing = [n for n, _ in expected if n.removeprefix("transformer.") not in stripped]
    known = {n.removeprefix("transformer.") for n, _ in expected} | {LM_HEAD}
    unexpected = sorted(set(stripped) - known)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing tensors: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected tensors: " + ", ".join(unexpected))
        raise HFWeightsError(
            f"{source} does not hold the GPT-2 that {config_path.name} describes ({config}): "
            + "; ".join(parts) + ". Re-download or re-export the checkpoint"
        )
    state = {}
    for name, shape in expected:
        value = stripped[name.removeprefix("transformer.")]
        if name.endswith(CONV1D):
            value = value.T  # Conv1D stores (in, out); our linear weights are (out, in)
        if tuple(value.shape) != shape:
            raise HFWeightsError(f"{source}: {name} has shape {tuple(value.shape)} but config.json implies {shape}")
        state[name] = value
    if LM_HEAD in stripped:
        state[LM_HEAD] = stripped[LM_HEAD]  # load_state_dict checks that it equals wte
    model = GPT(config, dtype=dtype, backend=backend, init_weights=False)
    model.load_state_dict(state)
    return model


def hf_config(config, vocab_size):
    """config.json contents that transformers reads as this GPT-2."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "resid_pdrop": 0.0,  # dropout off: the model was trained here without it
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": GPT2_VOCAB - 1 if vocab_size >= GPT2_VOCAB else None,
        "eos_token_id": GPT2_VOCAB - 1 if vocab_size >= GPT2_VOCAB else None,
        "torch_dtype": "float32",
    }


def save_hf(model, directory, vocab_size=None):
    """Write model.safetensors and config.json in the Hugging Face GPT-2 format.

    vocab_size: rows of wte to export; by default GPT-2's 50257 when the model's
    vocab is padded past it (the padding rows are dropped), else all of them.
    Weights are written as float32, Conv1D weights transposed to (in, out), and
    lm_head is left out: transformers ties it to wte on load.
    """
    cfg = model.config
    vocab_size = export_vocab_size(cfg) if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {cfg.vocab_size}] (the model's vocab)")
    tensors = {}
    for name, _ in parameter_shapes(cfg):
        value = to_host(model.params[name]).astype(np.float32)
        if name == WTE:
            value = value[:vocab_size]
        if name.endswith(CONV1D):
            value = value.T  # back to Conv1D's (in, out)
        tensors[name] = np.ascontiguousarray(value)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors_io.save(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    with safetensors_io.atomic_open(directory / "config.json") as f:
        f.write((json.dumps(hf_config(cfg, vocab_size), indent=2) + "\n").encode())


# ---- llm.c format ------------------------------------------------------------------


def _llmc_tensors(L):
    """[(llm.c name, [our names])]: each llm.c tensor is our per-layer tensors stacked."""
    out = []
    for llmc_name, ours in LLMC_ORDER:
        if ours.startswith("transformer."):
            out.append((llmc_name, [ours]))
        else:
            out.append((llmc_name, [f"transformer.h.{i}.{ours}" for i in range(L)]))
    return out


def save_llmc(model, path, dtype="float32", vocab_size=None):
    """Write an llm.c model file (version 3 float32, or 5 bfloat16), atomically.

    The header's vocab_size is GPT-2's 50257 for a padded model (or `vocab_size`),
    and wte is written with padded_vocab_size rows: the model's vocab rounded up
    to a multiple of 128, the new rows zeros.
    """
    versions = {v: k for k, v in LLMC_VERSIONS.items()}
    if dtype not in versions:
        raise ValueError(f"dtype {dtype!r}: llm.c files hold {' or '.join(versions)}")
    cfg = model.config
    vocab_size = export_vocab_size(cfg) if vocab_size is None else int(vocab_size)
    padded = -(-cfg.vocab_size // 128) * 128
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:8] = [LLMC_MAGIC, versions[dtype], cfg.block_size, vocab_size, cfg.n_layer,
                  cfg.n_head, cfg.n_embd, padded]

    def encode(a):
        a = to_host(a).astype(np.float32)
        return _bf16_bits(a) if dtype == "bfloat16" else a.astype("<f4")

    with safetensors_io.atomic_open(path) as f:
        f.write(header.tobytes())
        for llmc_name, names in _llmc_tensors(cfg.n_layer):
            for name in names:  # stacked over layers = written one layer after another
                if name == WTE:
                    wte = np.zeros((padded, cfg.n_embd), dtype=np.float32)
                    wte[: cfg.vocab_size] = to_host(model.params[WTE])
                    f.write(encode(wte).tobytes())
                else:
                    f.write(encode(model.params[name]).tobytes())


def _bf16_bits(a):
    return safetensors_io.float32_to_bf16_bits(a).astype("<u2")


def read_llmc_header(path):
    """The llm.c header as a dict, after checking magic, version and file size."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if size < 4 * LLMC_HEADER_INTS:
        raise LlmcModelError(f"{path}: {size} bytes, too short for an llm.c model file (1024-byte header)")
    magic, version = int(header[0]), int(header[1])
    if magic != LLMC_MAGIC:
        hints = {20240327: "an llm.c debug state file", 20240328: "an llm.c tokenizer file",
                 20240520: "a token data shard"}
        what = hints.get(magic, "not an llm.c model file")
        raise LlmcModelError(f"{path}: magic number {magic}, expected {LLMC_MAGIC}: this is {what}")
    if version not in LLMC_VERSIONS:
        raise LlmcModelError(
            f"{path}: llm.c model file version {version}; this reader takes version 3 (float32) or "
            "5 (bfloat16), both with a padded vocab. Re-export it with a current llm.c train_gpt2.py"
        )
    h = dict(zip(("max_seq_len", "vocab_size", "num_layers", "num_heads", "channels", "padded_vocab_size"),
                 (int(x) for x in header[2:8])))
    h["dtype"] = LLMC_VERSIONS[version]
    C, L, Vp, T = h["channels"], h["num_layers"], h["padded_vocab_size"], h["max_seq_len"]
    if min(C, L, Vp, T, h["num_heads"]) <= 0 or h["vocab_size"] > Vp:
        raise LlmcModelError(f"{path}: the header holds impossible sizes {h}; the file is corrupt")
    if C % h["num_heads"]:
        raise LlmcModelError(f"{path}: channels {C} is not divisible by num_heads {h['num_heads']}, so the header "
                             "describes no GPT-2; the file is corrupt")
    n_params = Vp * C + T * C + L * 12 * C * C + L * 13 * C + 2 * C
    itemsize = 4 if h["dtype"] == "float32" else 2
    expected = 4 * LLMC_HEADER_INTS + n_params * itemsize
    if size != expected:
        raise LlmcModelError(
            f"{path}: {size} bytes, but its header ({h}) implies {expected}; the file is truncated or corrupt"
        )
    return h


def load_llmc(path, dtype=np.float32, backend="numpy", keep_padding=True):
    """A GPT from an llm.c model file.

    keep_padding=True: the model gets all padded_vocab_size rows of wte, llm.c's
    tensor shapes (what save_llmc writes back). It is then a padded_vocab_size-way
    model: the padding columns take part in its softmax and AdamW updates their rows,
    whereas llm.c's softmax stops at vocab_size and never touches them, so its loss
    is higher than llm.c's by log(1 + sum of exp(padding logits) / sum of exp(real
    logits)) (8-9e-5 relative at GPT-2 124M). keep_padding=False cuts wte to the
    header's vocab_size rows: the same softmax, loss and updates as llm.c's
    train_gpt2.c (tests/test_pretrained.py holds both statements).
    """
    h = read_llmc_header(path)
    vocab = h["padded_vocab_size"] if keep_padding else h["vocab_size"]
    config = GPTConfig(block_size=h["max_seq_len"], vocab_size=vocab, n_layer=h["num_layers"],
                       n_head=h["num_heads"], n_embd=h["channels"])
    shapes = dict(parameter_shapes(config))
    shapes[WTE] = (h["padded_vocab_size"], config.n_embd)
    stored = np.dtype("<f4") if h["dtype"] == "float32" else np.dtype("<u2")
    data = np.memmap(path, dtype=stored, mode="r", offset=4 * LLMC_HEADER_INTS)
    state, offset = {}, 0
    for _, names in _llmc_tensors(config.n_layer):
        for name in names:
            shape = shapes[name]
            n = int(np.prod(shape))
            raw = data[offset : offset + n].reshape(shape)
            offset += n
            value = safetensors_io.bf16_bits_to_float32(raw) if h["dtype"] == "bfloat16" else np.array(raw)
            state[name] = value[:vocab] if name == WTE else value
    del data
    model = GPT(config, dtype=dtype, backend=backend, init_weights=False)
    model.load_state_dict(state)
    return model


# ---- GPT.from_pretrained / model.save_pretrained ----------------------------------------
# This file builds on model.py, so model.py cannot import it. The two methods the
# README shows are these functions, attached to GPT by nanogpt_np/__init__.py.


def from_pretrained(cls, path_or_name, dtype=np.float32, backend="numpy", **kwargs):
    """GPT.from_pretrained: a GPT-2 from Hugging Face weights (a directory with
    model.safetensors and config.json, or a name such as "gpt2" found in the local
    Hugging Face cache) or from an llm.c model file (gpt2_124M.bin). See load."""
    return load(path_or_name, dtype=dtype, backend=backend, **kwargs)


def save_pretrained(model, directory, vocab_size=None):
    """model.save_pretrained: model.safetensors and config.json that transformers'
    GPT2LMHeadModel loads; a padded vocab is cut back to GPT-2's 50257 (see save_hf)."""
    save_hf(model, directory, vocab_size=vocab_size)
