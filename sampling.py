"""Sampling from a local model: chat prompts with a prefill, batched decoding, stop tokens (ARCHITECTURE §10).

    python sampling.py --prompt "What is 47 * 6?"            # embedded SmolLM2-135M, greedy chat answer
    python sampling.py path/to/hf_dir --prompt "Hi" --max-new-tokens 32 --adapter runs/default/iter_1/adapter

sample() is what collect.py and evaluate.py call for the local generator; a vLLM server is the
other source (generator.py). Both return the prompt's token ids with every sample, so training
scores exactly the tokens that were sampled.
"""
import argparse

import torch
from jinja2.exceptions import TemplateError
from transformers import DynamicCache, StaticCache

import attention
import config
from lora import load_adapter
from model import DEFAULT_MODEL, ModelError, load_model  # `model` is an argument name here

def system_supported(tokenizer):
    """Whether the chat template renders a system message. Gemma's and older Mistral's raise instead
    ("System role not supported", "roles must alternate"). Not cached: the template may change."""
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
    restricted to the smallest set of tokens whose mass reaches top_p (HF's order: T, then top-p).
    gen: one torch.Generator for all rows, or a list with one per row (the executor server: each
    request's draws then depend on its own seed, not on the requests batched with it)."""
    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    probs = torch.softmax(logits.float() / torch.where(hot, temperature, 1.0)[:, None], -1)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    if isinstance(gen, list):
        drawn = torch.cat([torch.multinomial(probs[i], 1, generator=g) if h else greedy[i:i + 1]
                           for i, (g, h) in enumerate(zip(gen, hot.tolist()))])
    else:
        drawn = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return torch.where(hot, drawn, greedy)


TOP_K_FIRST = 256  # candidates _top_p looks at before it sorts a whole row
PREFIXES_KEPT = 4  # distinct shared prefixes a memo holds (_prefill): ~40 MB each for the embedded generator


def _top_p(probs, top_p):
    """probs [rows, V] kept on the smallest set of most likely tokens whose mass reaches top_p (the
    rest zeroed, not renormalized: multinomial takes weights). Sorting all V (49k) tokens per row
    was a sixth of decode time, so each row's top 256 come first: when their mass reaches top_p the
    set lies inside them and the result is top_p_sorted's (the same values, cumulated in the same
    order); only the rows whose top 256 fall short are sorted whole."""
    p, idx = probs.topk(min(TOP_K_FIRST, probs.shape[-1]), -1)  # sorted, most likely first
    out = _kept(probs, p, idx, top_p)
    short = (p.cumsum(-1)[:, -1] < top_p).nonzero().squeeze(-1)
    if len(short):
        out[short] = top_p_sorted(probs[short], top_p)
    return out


def top_p_sorted(probs, top_p):
    """_top_p with every row's whole vocabulary sorted (the sampler before the top-256 path)."""
    p, idx = probs.sort(-1, descending=True)
    return _kept(probs, p, idx, top_p)


def _kept(probs, p, idx, top_p):
    """p: a row's most likely probabilities in descending order, idx their columns: those whose mass
    before them is still short of top_p (the top one always), scattered into zeros like probs."""
    return torch.zeros_like(probs).scatter_(-1, idx, p * ((p.cumsum(-1) - p) < top_p))


def _per_prompt(x, k, name):
    x = list(x) if isinstance(x, (list, tuple)) else [x] * k
    if len(x) != k:
        raise ValueError(f"{name}: one value per prompt expected ({k}), got {len(x)}")
    return x


@torch.no_grad()
def decode(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=(), pad=0, gen=None,
           on_done=None, prefixes=None):
    """The sampler under `sample`: n continuations of each token-id prompt,
    as [(token_ids, logprobs)] prompt-major (the n of prompt 0 first). temperature and
    max_new_tokens: one number or one per prompt; gen: a generator, or a list of one per row. A
    row stops after any id in `stop` (an int or a collection; the stop token is kept) or at its
    budget. on_done(row, token_ids, logprobs) is called as each row ends (the executor server
    answers that request then, not when the batch's longest reply ends). prefixes: see _prefill.

    Three things make a 135M model usable on two CPU cores: (1) the prompts' common prefix (the
    generator's ~900-token few-shot block) runs once at batch 1 and each prompt's own suffix once,
    never n times; (2) a preallocated KV cache (HF StaticCache) -- a growing one re-copies every
    layer's keys at every token; (3) rows that stopped are dropped from the batch whenever half of
    its rows have stopped. With attention.use(model, "shared") the prefix's keys/values are also
    held once, not copied into every row's cache (attention.shared_prefix_decode_cache)."""
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
    cache, logits, mask, pos, start = _prefill(model, prompts, pad, int(budget.max()), prefixes)
    # n rows per prompt from here on
    repeat = lambda x: x.repeat_interleave(n, 0)
    logits, mask, temps, budget, pos = _rows(cache, repeat, logits, mask, temps, budget, pos)
    pos = pos + 1
    rows = torch.arange(k * n, device=device)  # original row of each active row
    tokens = [[] for _ in range(k * n)]
    logprobs = [[] for _ in range(k * n)]
    stops, done = set(stop), set()
    live = torch.ones(k * n, dtype=torch.bool, device=device)  # rows that have not stopped yet

    def cut(r):  # a row that stopped decodes on until it is compacted away: its end is its first stop or budget
        T = min(next((i + 1 for i, x in enumerate(tokens[r]) if x in stops), len(tokens[r])), limits[r // n])
        return tokens[r][:T], logprobs[r][:T]
    for t in range(int(budget.max())):
        nxt = _pick(logits, temps, top_p, [gen[r] for r in rows.tolist()] if isinstance(gen, list) else gen)
        step_logprobs = logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        for r, token, logprob in zip(rows.tolist(), nxt.tolist(), step_logprobs.tolist()):
            tokens[r].append(token)
            logprobs[r].append(logprob)
        live &= ~torch.isin(nxt, stop_t) & (budget > t + 1)  # a stopped row's later tokens don't revive it
        if on_done is not None:
            for r in set(rows[~live].tolist()) - done:
                done.add(r)
                on_done(r, *cut(r))
        if not bool(live.any()):
            break
        if int(live.sum()) <= len(rows) // 2:  # compact: stopped rows cost a full forward each step
            keep = live.nonzero().squeeze(-1)
            rows, nxt, mask, temps, budget, pos, live = _rows(cache, lambda x: x[keep], rows, nxt, mask, temps, budget,
                                                              pos, live)
        mask[:, start + t] = 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits, pos = res.logits[:, -1], pos + 1
    return [cut(r) for r in range(k * n)]  # the stop token is kept: training learns to stop


def _prefill(model, prompts, pad, new_tokens, prefixes=None):
    """Run the prompts into a fresh StaticCache with room for `new_tokens` more per row: their
    common prefix (P tokens) once at batch 1, then each prompt's own tokens right-aligned after it
    (S columns; the gap is masked, positions skip it). Returns (cache, the last logits, the
    attention mask over the cache, the last prompt token's position, where the generated tokens
    start in the cache). The cache holds [prefix; own] per row, or, when the model's attention
    shares prefixes (attention.py), only the own part, the prefix once beside it. There, `prefixes`
    (a dict the caller keeps across calls while the weights stay the same) memoizes the prefix's
    keys/values by its token ids: the ~900-token few-shot block is run once per phase, not once per
    batch (~3.6 s each on one core). The memo is exact: a batch whose common prefix is another
    length runs its own, so every batch computes what it would alone."""
    device = next(model.parameters()).device
    k = len(prompts)
    # shared prefix, leaving every prompt at least one token of its own (its last logits)
    P = 0
    while P < min(map(len, prompts)) - 1 and all(p[P] == prompts[0][P] for p in prompts):
        P += 1
    S = max(len(p) - P for p in prompts)
    shared = P > 0 and attention.shares_prefixes(model)
    at = 0 if shared else P  # where the own part starts in the cache
    L = at + S + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=L)
    mask = torch.zeros(k, L, dtype=torch.long, device=device)
    if shared:
        key = tuple(prompts[0][:P])
        prefix = None if prefixes is None else prefixes.get(key)
        if prefix is None:
            prefix = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([key], device=device), past_key_values=prefix, use_cache=True,
                  logits_to_keep=1)
            if prefixes is not None:
                while len(prefixes) >= PREFIXES_KEPT:
                    prefixes.pop(next(iter(prefixes)))
                prefixes[key] = prefix
        cache = attention.shared_prefix_decode_cache(prefix, cache)
    elif P:
        first = torch.zeros(1, L, dtype=torch.long, device=device)
        first[0, :P] = 1
        model(input_ids=torch.tensor([prompts[0][:P]], device=device), attention_mask=first, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        for layer in cache.layers:  # the prefix's keys/values, once per prompt
            layer.keys, layer.values = layer.keys.expand(k, -1, -1, -1).clone(), layer.values.expand(k, -1, -1, -1).clone()
    ids = torch.full((k, S), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, S - (len(p) - P):] = torch.tensor(p[P:], device=device)
        mask[i, :at] = 1
        mask[i, at + S - (len(p) - P):at + S] = 1
    pos = (P - at) + (mask[:, :at + S].cumsum(-1) - 1).clamp(min=0)[:, at:]  # the prefix's P positions come first
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return cache, res.logits[:, -1], mask, pos[:, -1:], at + S


def _rows(cache, pick, *tensors):
    """`pick` (rows of a batch -> rows) applied to every cache layer's keys and values, in place,
    and to each tensor, returned: the batch's rows repeated or compacted all alike."""
    for layer in cache.layers:
        layer.keys, layer.values = pick(layer.keys), pick(layer.values)
    return [pick(x) for x in tensors]


def sample(model, tokenizer, messages_list, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
           seed=0, prefill=None, batch_size=32, prefixes=None):
    """n completions per prompt: [[{text, token_ids, logprobs, prompt_ids}] * n] * len(messages_list).

    Temperature 0 = greedy. `logprobs` are of the sampled tokens under the model's *unscaled*
    distribution (temperature 1, no top-p) -- that is pi_old for GRPO. token_ids end with the stop
    token when the model stopped (any of stop_ids); `text` is the continuation after the prefill,
    without it. `prompt_ids` are the prompt's token ids as sampled (template + prefill). The same
    seed and inputs give the same outputs. Batches hold batch_size rows (prompts x n). prefixes: a
    dict kept across calls with the same weights (_prefill); each call keeps one anyway."""
    stops = stop_ids(model, tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else min(stops))
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // n)
    prefixes = {} if prefixes is None else prefixes
    out = []
    for b0 in range(0, len(messages_list), per_batch):
        gen = torch.Generator(device=device).manual_seed(config.seed_of(seed, "batch", b0))  # per batch: resumes match
        ids = [prompt_ids(tokenizer, m, prefill) for m in messages_list[b0:b0 + per_batch]]
        res = decode(model, ids, n, max_new_tokens, temperature or 0.0, top_p, stops, pad, gen, prefixes=prefixes)
        for i, (tk, lp) in enumerate(res):
            text_ids = tk[:-1] if tk and tk[-1] in stops else tk
            out.append({"text": tokenizer.decode(text_ids, skip_special_tokens=True), "token_ids": tk, "logprobs": lp,
                        "prompt_ids": list(ids[i // n])})
    return [out[i * n:(i + 1) * n] for i in range(len(messages_list))]


def hit_cap(token_ids, max_new_tokens, stops):
    """True when a completion ran into max_new_tokens instead of ending on a stop token."""
    return len(token_ids) >= max_new_tokens and not (token_ids and token_ids[-1] in stops)


def stop_ids(model, tokenizer, generation_config=None):
    """Every token id that ends a turn: generation_config.eos_token_id (an int or a list: Gemma adds
    <end_of_turn>, Phi-3 <|end|>, Llama 3 <|eot_id|>) and the tokenizer's eos. Decoding on the
    tokenizer's eos alone runs such models to the token limit. `generation_config` defaults to the
    model's; the remote sampler, which loads no model, passes the model dir's (vLLM stops on all)."""
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    ids = set()
    for src in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update([src] if isinstance(src, int) else (src or []))
    if not ids:
        raise ModelError(f"{getattr(model, 'name_or_path', type(model).__name__)}: no eos token id in the "
                         f"tokenizer or generation_config.json, so sampling would never stop")
    return frozenset(int(i) for i in ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF dir / hub id / .gguf / embedded name")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--adapter", default=None, help="a PEFT-layout adapter dir to apply")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    def load():
        loaded = load_model(args.model, device=args.device)
        if args.adapter:
            load_adapter(loaded[0], args.adapter)
        return loaded
    model, tok = config.cli(load)
    res = sample(model, tok, [[{"role": "user", "content": args.prompt}]], max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature)
    print(res[0][0]["text"])


if __name__ == "__main__":
    main()
