"""The quality grid's conditions, shared by run.py (which runs them) and report.py (which tabulates them).

No torch import here: report.py must stay importable without it.
"""

CONDITIONS = ("clean", "noise20", "noise40", "shock", "shockrand")
NOISE = {"clean": 0.0, "noise20": 0.2, "noise40": 0.4}  # symmetric label noise on the train split only
SHOCKS = ("shock", "shockrand")  # shockrand: the shock with uniformly random labels instead of flipped ones
SEEDS_WANTED = {c: 5 if c in SHOCKS else 3 for c in CONDITIONS}  # the issue: >= 3 seeds, 5 for the shock
