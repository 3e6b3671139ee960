"""Model families beyond Llama: chat templates without a system role, several stop ids, scaled or
capped logits, fused projections, and training on the prompt ids that sampling saw. Tiny random
models built from a config and fixture chat templates; nothing is downloaded."""
import json

import pytest
import torch

import config
import curate
import model
import train
from conftest import tiny_llama, tiny_tokenizer
import operators
import workflow
import kernels
import lora
import losses
import sampling
import rollout

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny(config_cls, model_cls, seed=0, **kw):
    """A randomly initialised model of any family from a small config."""
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SMALL, **kw})).eval()


# ---- chat templates that refuse the system role ---------------------------------------------------

BODY = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>a:{% endif %}")
# Gemma: an explicit refusal; older Mistral: the roles must alternate user/assistant from the start
GEMMA_LIKE = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + BODY
MISTRAL_LIKE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% endfor %}" + BODY)
CONV = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "what is 1+2?"},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2+2?"}]


@pytest.mark.parametrize("template", [GEMMA_LIKE, MISTRAL_LIKE], ids=["gemma", "mistral"])
def test_system_folded_into_first_user_turn_when_template_refuses_it(template):
    tok = tiny_tokenizer()
    tok.chat_template = template
    folded = [{"role": "user", "content": "be brief.\n\nwhat is 1+2?"}] + CONV[2:]
    want = tok.apply_chat_template(folded, add_generation_prompt=True, tokenize=False)
    assert sampling.prompt_text(tok, CONV, prefill="x") == want + "x"
    assert sampling.prompt_ids(tok, CONV) == tok(want, add_special_tokens=False)["input_ids"]
    # the generator's real prompt (system + few-shot turns) renders too
    assert sampling.prompt_ids(tok, workflow.build_prompt("What is 2 + 3?", "math"), workflow.PREFILLS["math"])


def test_system_kept_when_template_accepts_it():
    tok = tiny_tokenizer()
    assert sampling.prompt_text(tok, CONV) == tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    assert sampling.prompt_text(tok, CONV).startswith("<s>s:be brief.</s>")


# ---- stop ids -------------------------------------------------------------------------------------

def forced(m, token):
    """Make `token` the overwhelming next token everywhere (a hook on the LM head)."""
    return m.lm_head.register_forward_hook(
        lambda mod, inp, out: out + torch.nn.functional.one_hot(torch.tensor(token), out.shape[-1]).to(out.dtype) * 50)


def test_sampling_stops_on_every_generation_config_eos():
    m, tok = tiny_llama(), tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    m.generation_config.eos_token_id = [2, eot]  # Gemma: <eos> and <end_of_turn>
    msgs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is 4*4?"}]]
    for stop in (eot, 2):
        h = forced(m, stop)
        try:
            res = sampling.sample(m, tok, msgs, n=2, max_new_tokens=20, temperature=1.0, seed=0)
        finally:
            h.remove()
        for r in (r for per in res for r in per):
            # the stop token stays in token_ids (training learns to stop), the text drops it
            assert r["token_ids"] == [stop] and r["text"] == "" and len(r["logprobs"]) == 1
            assert not sampling.hit_cap(r["token_ids"], 20, sampling.stop_ids(m, tok))
    assert sampling.stop_ids(m, tok) == {2, eot}


def test_generation_config_eos_int_joins_tokenizer_eos():
    m, tok = tiny_llama(), tiny_tokenizer()
    m.generation_config.eos_token_id = 7  # Phi-3: <|end|> in generation_config, <|endoftext|> in the tokenizer
    h = forced(m, 7)
    try:
        r = sampling.sample(m, tok, [[{"role": "user", "content": "hi"}]], max_new_tokens=9, temperature=0)[0][0]
    finally:
        h.remove()
    assert r["token_ids"] == [7]
    assert sampling.stop_ids(m, tok) == {2, 7}


def test_decode_stop_set_cuts_each_row_at_its_first_stop():
    m, tok = tiny_llama(), tiny_tokenizer()
    p = sampling.prompt_ids(tok, [{"role": "user", "content": "count: 1 2 3"}])
    ids, _ = sampling.decode(m, [p], max_new_tokens=12, temperature=0.0, stop=())[0]
    assert len(ids) == 12
    stop = {ids[4], ids[7]}  # two ids from the free run: it must end at the first one of either
    cut = min(i for i, x in enumerate(ids) if x in stop) + 1
    assert sampling.decode(m, [p], max_new_tokens=12, temperature=0.0, stop=stop)[0][0] == ids[:cut]
    assert not sampling.hit_cap(ids[:cut], cut, stop) and sampling.hit_cap(ids, 12, set())  # a stop at the budget is a stop


# ---- logit scaling ----------------------------------------------------------------------------------

def scaled_model(family):
    """(tiny model, its head scale s: logits = s * h W^T)."""
    from transformers import (CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM,
                              HyperCLOVAXConfig, HyperCLOVAXForCausalLM, MiniCPM3Config, MiniCPM3ForCausalLM)
    untied = dict(tie_word_embeddings=False)
    return {"cohere": lambda: (tiny(CohereConfig, CohereForCausalLM, logit_scale=0.25), 0.25),  # logits * 0.25
            "granite": lambda: (tiny(GraniteConfig, GraniteForCausalLM, logits_scaling=4.0, **untied), 0.25),  # / 4
            "hyperclovax": lambda: (tiny(HyperCLOVAXConfig, HyperCLOVAXForCausalLM, logits_scaling=4.0, **untied), 4.0),
            # MiniCPM3 divides h by logits_scaling = hidden_size / dim_model_base = 4
            "minicpm3": lambda: (tiny(MiniCPM3Config, MiniCPM3ForCausalLM, num_key_value_heads=4, dim_model_base=8,
                                      kv_lora_rank=8, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                      v_head_dim=8, **untied), 0.25)}[family]()


@pytest.mark.parametrize("family", ["cohere", "granite", "hyperclovax", "minicpm3"])
def test_training_logprobs_equal_the_models_own_logits(family):
    m, scale = scaled_model(family)
    prompt, comps = [5, 9, 13, 7], [[22, 31, 4], [8, 8]]
    ref = []
    with torch.no_grad():
        for c in comps:
            lp = m(input_ids=torch.tensor([prompt + c])).logits[0].log_softmax(-1)
            ref += lp[len(prompt) - 1:-1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist()
        # one batch through completion_hidden (left padding) and through the shared-prompt path train uses
        L = max(len(prompt) + len(c) for c in comps)
        ids = torch.tensor([[0] * (L - len(prompt) - len(c)) + prompt + c for c in comps])
        attn = (torch.arange(L)[None] >= torch.tensor([L - len(prompt) - len(c) for c in comps])[:, None]).long()
        comp = torch.zeros_like(ids)
        for i, c in enumerate(comps):
            comp[i, L - len(c):] = 1
        h, W, y = model.completion_hidden(m, ids, attn, comp)
        a = kernels.fused_logprobs(h, W.to(h.dtype), y)
        h, W, y = model.shared_prompt_hidden(m, prompt, comps)
        b = kernels.fused_logprobs(h, W, y)
    assert a.tolist() == pytest.approx(ref, abs=1e-5)
    assert b.tolist() == pytest.approx(ref, abs=1e-5)
    assert model.head_scale(m) == scale
    model.check_head(m)
    unscaled = kernels.fused_logprobs(h / model.head_scale(m), W, y)
    assert (unscaled - torch.tensor(ref)).abs().max() > 1e-3  # the scale matters at this size


def test_softcapping_refused_with_the_config_key(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    m = tiny(Gemma2Config, Gemma2ForCausalLM, head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(model.ModelError, match="final_logit_softcapping"):
        model.head_scale(m)
    m.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(model.ModelError, match="final_logit_softcapping"):
        model.load_model(str(tmp_path))
    m.config.final_logit_softcapping = None  # Gemma 3's default: a plain head
    model.check_head(m)


def test_unknown_head_transform_refused():
    m = tiny_llama()
    m.lm_head.register_forward_hook(lambda mod, inp, out: out * 2)  # a family that scales in its forward
    with pytest.raises(model.ModelError, match="not supported"):
        model.check_head(m)


# ---- LoRA targets ---------------------------------------------------------------------------------

def family_models():
    from transformers import (GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    seven = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return {"llama": (tiny_llama, seven),
            "qwen2": (lambda: tiny(Qwen2Config, Qwen2ForCausalLM), seven),
            "gemma": (lambda: tiny(GemmaConfig, GemmaForCausalLM, head_dim=8), seven),
            "phi3": (lambda: tiny(Phi3Config, Phi3ForCausalLM, tie_word_embeddings=False),
                     {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_default_lora_wraps_every_decoder_projection(family):
    make, names = family_models()[family]
    m = lora.add_lora(make(), r=4, alpha=8)
    wrapped = lora.lora_modules(m)
    layers = m.config.num_hidden_layers
    assert {n.rpartition(".")[2] for n in wrapped} == names and len(wrapped) == layers * len(names)
    assert m.lora_config["target_modules"] == sorted(names)
    linear_left = [n for n, x in m.get_decoder().named_modules() if isinstance(x, torch.nn.Linear)
                   and not n.endswith((".base", ".lora_A", ".lora_B"))]
    assert not linear_left  # no projection of the decoder is left without an adapter


def test_phi3_adapter_round_trips_and_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    make, _ = family_models()["phi3"]
    m = lora.add_lora(make(), r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    for mod in lora.lora_modules(m).values():
        with torch.no_grad():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
    ids = torch.tensor([[5, 9, 13, 7, 22, 31]])
    with torch.no_grad():
        want = m(input_ids=ids).logits
        base = make()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3
    lora.save_adapter(m, tmp_path / "a", base_model_name="tiny-phi3")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]  # the real names
    m2 = lora.load_adapter(make(), tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, want)
        assert torch.allclose(pm(input_ids=ids).logits, want, atol=1e-6)


def test_lora_target_that_matches_nothing_is_an_error():
    make, _ = family_models()["phi3"]
    with pytest.raises(model.ModelError, match=r"q_proj.*qkv_proj"):
        lora.add_lora(make(), targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    m = lora.add_lora(make(), targets=("qkv_proj",))
    assert len(lora.lora_modules(m)) == 2


# ---- training sees the sampled prompt ids ---------------------------------------------------------

def dated(day):
    """A template that stamps the prompt with a value that changes between sampling and update."""
    return "<s>s:day " + day + "</s>" + BODY


def test_training_uses_the_sampled_prompt_ids():
    m, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = dated("1")
    problems = [{"id": "p0", "problem": "what is 1+2?"}, {"id": "p1", "problem": "what is 2*3?"}]
    msgs = [[{"role": "user", "content": p["problem"]}] for p in problems]
    samples = sampling.sample(m, tok, msgs, n=4, max_new_tokens=6, temperature=1.0, seed=0, prefill="x")
    rows = []
    for p, mm, per in zip(problems, msgs, samples):
        for j, s in enumerate(per):
            assert s["prompt_ids"] == sampling.prompt_ids(tok, mm, "x")
            row = rollout.workflow_row(p, j, mm, "x", s["text"], s["token_ids"], operators.OPERATOR_SETS["math"], 6,
                                       prompt_ids=s["prompt_ids"], hit_cap=sampling.hit_cap(s["token_ids"], 6, {2}))
            rows.append(dict(row, score=float(j % 2)))
    groups, _ = curate.curate(rows, mode="all")
    assert len(groups) == 2 and all(g["prompt_ids"] == samples[i][0]["prompt_ids"] for i, g in enumerate(groups))
    tok.chat_template = dated("2")  # the next day: a re-rendered prompt differs
    assert sampling.prompt_ids(tok, msgs[0], "x") != samples[0][0]["prompt_ids"]
    for loss in ("grpo", "scoredpo"):
        seqs = [s for u in train.sequences(groups, tok, losses.make(dict(config.defaults(), loss=loss, pairs_per_problem=2)), 0) for s in u]
        assert seqs
        sampled = {tuple(s["prompt_ids"] + s["token_ids"]) for per in samples for s in per}
        for s in seqs:
            assert tuple(s["ids"]) in sampled and s["n_prompt"] == len(samples[0][0]["prompt_ids"])


def test_old_groups_without_prompt_ids_are_re_rendered_and_mixed_prompts_stay_per_member():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    rows = [{"problem_id": "p", "sample": j, "prompt": msgs, "prefill": "", "completion": "a",
             "completion_ids": [4, 2], "score": float(j), "valid": True} for j in range(2)]
    (g,), _ = curate.curate(rows, mode="all")
    assert "prompt_ids" not in g
    assert train.sequences([g], tok, losses.make(config.defaults()), 0)[0][0]["ids"] == sampling.prompt_ids(tok, msgs) + [4, 2]
    rows[0]["prompt_ids"], rows[1]["prompt_ids"] = [1, 5], [1, 6]  # a resumed run re-rendered one of them
    (g,), _ = curate.curate(rows, mode="all")
    assert "prompt_ids" not in g and [x["prompt_ids"] for x in g["members"]] == [[1, 5], [1, 6]]
    assert [s["ids"] for s in train.sequences([g], tok, losses.make(config.defaults()), 0)[0]] == [[1, 5, 4, 2], [1, 6, 4, 2]]


def test_refine_groups_keep_the_state_prompt_ids(tmp_path):
    d = tmp_path / "iter_0"
    d.mkdir()
    base = {"kind": "candidate", "episode": 0, "turn": 0, "code": "c", "valid": True, "prompt": [], "prefill": "",
            "completion": "a", "repairs": 0, "prompt_ids": [1, 9, 9]}
    rows = [dict(base, candidate=c, completion_ids=[4 + c, 2], accuracy=a, reward=r)
            for c, (a, r) in enumerate([(0.5, 1.0), (0.0, 0.0)])]
    import jsonl
    jsonl.write_jsonl_atomic(d / "refine.jsonl", rows)
    curate.refine_groups(tmp_path, 0)
    (g,) = jsonl.read_jsonl(d / "groups.jsonl")
    assert g["prompt_ids"] == [1, 9, 9]
    assert [s["ids"] for s in train.sequences([g], tiny_tokenizer(), losses.make(dict(config.defaults(), loss="rwr")), 0)[0]] == [[1, 9, 9, 4, 2], [1, 9, 9, 5, 2]]


# ---- completions that hit the token cap -----------------------------------------------------------

def test_cap_warning_names_the_knob():
    rows = [{"hit_cap": x} for x in (True, False, False, False, False, False, False, False, False, False)]
    assert rollout.cap_warning(rows, "--max-new-tokens", 128) == (0.1, None)  # 10 %: not over
    frac, warning = rollout.cap_warning(rows + [{"hit_cap": True}], "--max-new-tokens", 128)
    assert frac == pytest.approx(2 / 11) and "--max-new-tokens 128" in warning
    assert rollout.cap_warning([{"valid": True}], "--refine-tokens", 160) == (0.0, None)  # rows of older runs


def test_sampled_completion_at_the_budget_counts_as_hit():
    m, tok = tiny_llama(), tiny_tokenizer()
    res = sampling.sample(m, tok, [[{"role": "user", "content": "hi"}]], n=3, max_new_tokens=5, temperature=1.0, seed=1)
    for r in res[0]:
        assert sampling.hit_cap(r["token_ids"], 5, sampling.stop_ids(m, tok)) == (len(r["token_ids"]) == 5 and r["token_ids"][-1] != 2)
