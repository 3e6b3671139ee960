"""Hand-written LoRA in PEFT's file layout (ARCHITECTURE §9).

    python -c "import lora, model; m, _ = model.load_model(); lora.add_lora(m); print(sum(p.numel() for p in lora.lora_parameters(m)))"

add_lora wraps the decoder's nn.Linear modules (resolved per model family) in LoRALinear:
y = W x + (alpha / r) * B A x with B = 0 at the start, so a fresh adapter changes nothing.
save_adapter / load_adapter write and read adapter_config.json + adapter_model.safetensors with
PEFT's key names, so a vLLM server or PEFT itself loads what this trains.
"""
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from model import ModelError  # `model` names the module's argument everywhere here

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


def save_adapter(model, out_dir, base_model_name=None):
    """PEFT layout: adapter_model.safetensors (base_model.model.<path>.lora_{A,B}.weight) and
    adapter_config.json; loadable by peft and by vLLM --enable-lora. Written to a temp dir and
    renamed, so a reader never sees half an adapter."""

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
