"""SPOGW update step and the --iter driver.

    python train.py --iter 3
"""

# ==== losses: pure tensor functions (owner: kernel helper) ====

# ==== update loop and driver (owner: lead) ====
