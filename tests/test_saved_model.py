"""Models spogw saves (a GGUF converted once into $SPOGW_CACHE, the embedded SmolLM2 included) read
the same in transformers 4.x, which a vLLM venv often pins, and 5.x, which spogw runs: a tiny
random Llama written as a GGUF here (no hub, no package) is converted by model.resolve_model_dir."""
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from gguf import GGUFWriter
from transformers import AutoConfig, AutoTokenizer

import model

THETA = 100000.0  # SmolLM2's RoPE base; a 4.x reader that misses it uses 10000
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def tiny_gguf(path, theta=THETA):
    """A 2-layer Llama GGUF, vocab 64 (byte-level BPE), float32 random weights."""
    w = GGUFWriter(str(path), "llama")
    V, H, F, L, heads, kv = 64, 32, 64, 2, 4, 2
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(H // heads)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(CHARS.replace(" ", "Ġ")) + ["ab"]
    tokens += [f"x{i}" for i in range(V - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (V, H), "output.weight": (V, H), "output_norm.weight": (H,)}
    for i in range(L):
        hd = H // heads
        tensors.update({f"blk.{i}.{k}": s for k, s in [
            ("attn_norm.weight", (H,)), ("ffn_norm.weight", (H,)), ("attn_q.weight", (H, H)),
            ("attn_k.weight", (kv * hd, H)), ("attn_v.weight", (kv * hd, H)), ("attn_output.weight", (H, H)),
            ("ffn_gate.weight", (F, H)), ("ffn_up.weight", (F, H)), ("ffn_down.weight", (H, F))]})
    for name, shape in tensors.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_as_4x(d):
    """What a transformers 4.x reader takes from a model dir's JSON: LlamaConfig's rope_theta
    (default 10000) and rope_scaling, PretrainedConfig's torch_dtype, and the tokenizer class
    AutoTokenizer instantiates by name."""
    cfg = json.loads((d / "config.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    return {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_scaling": cfg.get("rope_scaling"),
            "torch_dtype": cfg.get("torch_dtype"), "tokenizer_class": tc.get("tokenizer_class")}


# Tokenizer classes of transformers 4.x that load a tokenizer.json as it is (TokenizersBackend is 5.x only)
KNOWN_TO_4X = {"PreTrainedTokenizerFast"}


@pytest.fixture
def converted(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOGW_CACHE", str(tmp_path / "cache"))
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    return gguf, model.resolve_model_dir(gguf)


def check_both_readers(d, gguf):
    d = Path(d)
    old = read_as_4x(d)
    assert old["rope_theta"] == THETA and old["rope_scaling"] is None and old["torch_dtype"] == "float32"
    assert old["tokenizer_class"] in KNOWN_TO_4X and hasattr(transformers, old["tokenizer_class"])
    assert AutoConfig.from_pretrained(d).rope_parameters == {"rope_theta": THETA, "rope_type": "default"}
    text = "abc 12 ab"
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(d)(text)["input_ids"] == ref


def test_a_converted_gguf_reads_the_same_in_transformers_4_and_5(converted):
    gguf, d = converted
    check_both_readers(d, gguf)
    assert json.loads((Path(d) / "spogw_source.json").read_text())["format"] == model.CONVERTED_FORMAT
    m, _ = model.load_model(gguf)
    assert m.config.rope_parameters["rope_theta"] == THETA


def age(d):
    """Make a converted dir look like one an earlier spogw wrote: 5.x-only JSON, no format marker."""
    cfg = json.loads((d / "config.json").read_text())
    for k in ("rope_theta", "rope_scaling", "torch_dtype"):
        cfg.pop(k, None)
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, tokenizer_class="TokenizersBackend")))
    src = json.loads((d / "spogw_source.json").read_text())
    (d / "spogw_source.json").write_text(json.dumps({"gguf": src["gguf"]}))


def test_an_old_cache_of_the_embedded_model_is_brought_up_to_date_on_use(converted):
    """The embedded model is converted once per cache; one converted by an earlier spogw must not keep
    its 4.x-wrong config. (A tiny model stands in for SmolLM2 under its cache name.)"""
    gguf, d = converted
    cached = model.cache_root() / "smollm2-135m"
    Path(d).rename(cached)
    age(cached)
    assert read_as_4x(cached)["rope_theta"] == 10000.0  # what a 4.x reader made of the old cache
    assert model.resolve_model_dir("smollm2-135m") == str(cached)
    check_both_readers(cached, gguf)
