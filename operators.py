"""Operators that workflows call, the executor client, the static workflow checker and the
generator prompt (DESIGN §3, §4)."""

# ==== executor client (owner: sandbox helper) ====

# ==== operator library (owner: sandbox helper) ====

# ==== static checker and generator prompt (owner: benchmarks helper) ====
