"""Model stack: load a causal LM, hand-written LoRA, batched sampling, the fused log-prob kernel.

    python model.py --prompt "What is 47 * 6?"            # embedded SmolLM2-135M, greedy chat answer
    python model.py path/to/hf_dir --prompt "Hi" --max-new-tokens 32
"""

# ==== loading (owner: lead) ====

# ==== LoRA (owner: lead) ====

# ==== sampling (owner: lead) ====

# ==== fused log-prob kernel (owner: kernel helper) ====

# ==== CLI (owner: lead) ====
