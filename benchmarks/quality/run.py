"""Quality grid: PEFT LoRA / AdaLoRA vs unified-lora on GLUE, clean, noisy and shocked labels.

    python benchmarks/quality/run.py --tasks mrpc --methods lora_r8,unified_v1,adalora \
        --conditions clean,noise40 --seeds 0,1,2 --steps 150

Each (task, method, condition, seed) is one run that writes its own JSON to
`benchmarks/results/quality/runs/` (with the command, and the git commit the code
came from and whether the checkout was dirty); a run whose JSON exists is skipped,
so the grid fills up across sittings. `report.py` turns the JSONs into quality.md + plots.

Same budget for every method: the same steps, batch size, base learning rate
(--lr, chosen once for lora_r8 and reused), seeds, data order (the loader's
shuffle depends only on the seed), label noise (depends only on the seed) and
targets (--targets; by default PEFT's for the model type: query, value on BERT; the classifier head trains in
every method). Metrics are
taken on the GLUE dev set at the last step (no checkpoint selection on dev).

Methods
  lora_r4 / lora_r8 / lora_r16   PEFT LoRA (get_peft_model, LoraConfig)
  adalora                        PEFT AdaLoRA, init_r 12 -> target_r 8 (average budget of r8),
                                 update_and_allocate(step) after optimizer.step(), before zero_grad()
  unified_v1[_<policy>]          nested LoRA 4/8/16 + controller, v1 loss signal
  unified_v3[_<policy>]          nested LoRA 4/8/16 + controller, v3 composite signal
  unified_v1c[_<policy>]         v1 loss signal calibrated as in the demo: loss_scale = mean of the
                                 first 20 losses / 2.2, so the early loss sits just under the MIRROR
                                 threshold and a loss spike (a shock) crosses it
                                 policy: drift (default) | never | lossworse | always  (Mirror exit rule)
  unified_..._d<N>               the same with min_dwell=N (hysteresis: N steps in a mode before leaving it;
                                 the default 0 is the seed's machine), e.g. unified_v3_d10, unified_v3_lossworse_d10
  unified_..._fs                 the same with one fixed scale at every rank (scaling="alpha_over_max_rank",
                                 lora_alpha = --lora-alpha * 16 / 8): lora_r8's alpha / 8 at rank 4, 8 and 16,
                                 so a rank switch does not rescale the kept blocks (the default alpha / r
                                 doubles their scale at 8 -> 4), e.g. unified_v1_fs, unified_v3_d10_fs
Conditions
  clean | noise20 | noise40 (symmetric label noise on train only) | shock (labels corrupted for a
  window in the middle of training; dev metrics just before, just after and at the end) |
  shockrand (the same window, labels drawn uniformly at random instead of flipped)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, model_fingerprint  # noqa: E402
from _grid import CONDITIONS, NOISE, SEEDS_WANTED, SHOCKS, budget, budget_diff  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quality"
METHODS = ["lora_r4", "lora_r8", "lora_r16", "adalora", "unified_v1", "unified_v3", "unified_v1c",
           "unified_v1c_never", "unified_v1c_lossworse",
           "unified_v1_never", "unified_v1_lossworse", "unified_v3_never", "unified_v3_lossworse"]
TASKS = ["mrpc", "rte", "cola", "sst2"]
POLICIES = {"drift": "drift", "never": "never", "lossworse": "loss_worse", "always": "always"}


def run_name(task, method, condition, seed, tag="") -> str:
    return f"{task}__{method}__{condition}__s{seed}" + (f"__{tag}" if tag else "")


def run_config(args) -> dict:
    """The settings a run records in its JSON's "config" (everything but the grid's lists)."""
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
           if k not in ("tasks", "methods", "conditions", "seeds")}
    cfg["model_name"] = Path(args.model).name
    return cfg


def read_run(path: Path) -> dict:
    """A finished run's JSON, or a one-line error naming the file (an empty or truncated file is not a result)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable run JSON ({type(e).__name__}: {e}); delete it to run that "
                         "seed again (or rerun that seed with --force)") from None
    if not isinstance(res, dict) or not isinstance(res.get("config"), dict) or "seed" not in res:
        raise SystemExit(f"{path}: not a run JSON of this harness (no seed or config); move it out of the runs "
                         "folder (or rerun that seed with --force)")
    return res


def _claim_is_stale(path: Path) -> bool:
    """Whether a claim's worker is gone: claims hold the claiming process's id, and the claim folder is machine-local.
    An empty claim (being written, or made by hand) counts as held."""
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def take_claim(claims: Path, name: str) -> bool:
    """Create claims/<name>.claim (O_EXCL) holding this process's id. A claim left by a worker that died (killed,
    crashed: its run wrote no JSON) is taken over, so a restarted worker runs the job instead of skipping it forever;
    of two workers that find the same stale claim, one takes it."""
    path = claims / f"{name}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _claim_is_stale(path):
                return False
            try:  # rename, not unlink: only one worker's rename of this claim succeeds
                grave = path.with_name(f"{path.name}.stale.{os.getpid()}")
                os.rename(path, grave)
                grave.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True
    return False


def check_budgets(runs_dir: Path, jobs, args) -> None:
    """Refuse, before anything runs, a grid whose budget differs from a finished run of one of its cells
    (task, method, condition, tag; any seed): that run would be skipped, or its cell's mean ± std would average
    two budgets. With --force, the seeds this command runs again do not count (they are overwritten)."""
    mine = run_config(args)
    cells = {(task, method, condition) for _, task, condition, method in jobs}
    rerun = {f"{run_name(task, method, condition, seed, args.tag)}.json" for seed, task, condition, method in jobs
             } if args.force else set()
    for task, method, condition in sorted(cells):
        want = budget(mine, task, method, condition)
        for path in sorted(runs_dir.glob(f"{task}__{method}__{condition}__s*.json")):
            if path.name in rerun:
                continue
            old = read_run(path)
            if path.name != f"{run_name(task, method, condition, old['seed'], args.tag)}.json":
                continue  # another tag's run
            diff = budget_diff(budget(old["config"], task, method, condition), want)
            if diff:  # a cell must not mix budgets: its mean ± std would be meaningless
                raise SystemExit(f"{path.name} exists with a different budget {diff} (its value, this command's); "
                                 "use --tag, --out or --force")


# ----------------------------------------------------------------------------- data
_DATA_CACHE: dict = {}


def load_task(task: str, args):
    """Encoded train/dev tensors (clean labels) plus the raw label lists; cached per process. The tokenizer is
    loaded as `unified-lora train` loads it (`load_tokenizer`): one without a pad token (GPT-2's, Llama's) pads with
    its eos token, on the side it pads (Llama's: the left)."""
    from unified_lora.data import encode, load_glue
    from unified_lora.training import load_tokenizer

    key = (task, args.model, args.max_length, args.quick, args.sst2_train_size)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    train = load_glue(task, "train", args.data_dir)
    dev = load_glue(task, "dev", args.data_dir)
    tr_ex, dv_ex = list(train.examples), list(dev.examples)
    if task == "sst2" and args.sst2_train_size and len(tr_ex) > args.sst2_train_size:
        tr_ex = random.Random(1234).sample(tr_ex, args.sst2_train_size)  # one fixed subset for every run
    if args.quick:
        tr_ex, dv_ex = random.Random(0).sample(tr_ex, 64), random.Random(0).sample(dv_ex, 48)
    tok = load_tokenizer(args.model)
    enc_tr = encode(tok, tr_ex, max_length=args.max_length, padding="max_length")
    enc_dv = encode(tok, dv_ex, max_length=args.max_length, padding="max_length")
    out = {"train": enc_tr, "dev": enc_dv, "num_labels": train.num_labels,
           "train_labels": [e.label for e in tr_ex], "dev_labels": [e.label for e in dv_ex]}
    _DATA_CACHE[key] = out
    return out


@torch.no_grad()
def evaluate(model, enc: dict, task: str, batch_size: int = 64) -> dict:
    from unified_lora.data import glue_metrics
    from unified_lora.training import trim_padding

    was_training = model.training
    model.eval()
    preds = []
    n = len(enc["labels"])
    for i in range(0, n, batch_size):
        b = trim_padding({k: v[i:i + batch_size] for k, v in enc.items()})
        b.pop("labels")
        dev = next(model.parameters()).device
        b = {k: v.to(dev) for k, v in b.items()}
        preds.append(model(**b).logits.argmax(-1))
    model.train(was_training)
    return glue_metrics(task, torch.cat(preds).tolist(), enc["labels"].tolist())


# --------------------------------------------------------------------------- methods
def parse_unified(method: str) -> tuple[str, str, int, str]:
    """unified_<v1|v3|v1c>[_<policy>][_d<N>][_fs] -> (signal, Mirror policy, min_dwell, scaling)."""
    parts = method.split("_")
    if len(parts) < 2 or parts[0] != "unified" or parts[1] not in ("v1", "v3", "v1c"):
        raise ValueError(f"method: unknown {method!r}; choose from {METHODS}")
    policy, dwell, scaling = "drift", 0, "alpha_over_r"
    rest = parts[2:]
    if rest and rest[-1] == "fs":
        scaling, rest = "alpha_over_max_rank", rest[:-1]
    for i, p in enumerate(rest):
        if i == 0 and p in POLICIES:
            policy = POLICIES[p]
        elif i == len(rest) - 1 and p[:1] == "d" and p[1:].isdigit():
            dwell = int(p[1:])
        else:
            raise ValueError(f"method {method!r}: {p!r} is not a Mirror policy {sorted(POLICIES)}, d<N> (min_dwell) "
                             "or a final fs (fixed scale), in that order")
    return parts[1], policy, dwell, scaling


def build(method: str, model, args, total_steps: int, num_labels: int):
    """Returns (model, ctrl or None, info dict). `model` may be a PeftModel wrapper."""
    targets = args.targets.split(",")
    info: dict = {"targets": targets}
    if method.startswith("lora_r"):
        from peft import LoraConfig, get_peft_model

        r = int(method[len("lora_r"):])
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=targets)
        return get_peft_model(model, cfg), None, {**info, "rank": r}
    if method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        tinit, tfinal = max(1, int(0.1 * total_steps)), max(1, int(0.2 * total_steps))
        cfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=12, target_r=8, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, target_modules=targets, tinit=tinit, tfinal=tfinal,
                            deltaT=max(1, total_steps // 30), total_step=total_steps, beta1=0.85, beta2=0.85,
                            orth_reg_weight=args.adalora_orth_reg)
        return get_peft_model(model, cfg), None, {**info, "init_r": 12, "target_r": 8, "tinit": tinit,
                                                  "orth_reg_weight": args.adalora_orth_reg,
                                                  "tfinal": tfinal, "deltaT": cfg.deltaT}
    if method.startswith("unified_"):
        from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora
        from unified_lora.layer import scaling_for
        from unified_lora.training import seq_cls_head

        sig_name, policy, dwell, scaling = parse_unified(method)
        # alpha_over_max_rank: alpha / 16 at every rank; doubling alpha makes it lora_r8's alpha / 8
        alpha = args.lora_alpha * 16 / 8 if scaling == "alpha_over_max_rank" else args.lora_alpha
        signal = {"v1": "loss", "v3": "composite", "v1c": "loss"}[sig_name]
        if sig_name == "v1c":  # the demo's calibration (unified_lora.cli.DEMO_CALIBRATION)
            from unified_lora.cli import DEMO_CALIBRATION

            signal = SignalConfig(kind="loss", calibration_steps=DEMO_CALIBRATION[0],
                                  calibration_target=DEMO_CALIBRATION[1])
        adapters, ctrl = setup_unified_lora(model, target_modules=targets, rank_levels=(4, 8, 16),
                                            lora_alpha=alpha, lora_dropout=args.lora_dropout, scaling=scaling,
                                            modules_to_save=seq_cls_head(model), signal=signal, lr_mode="multiplier",
                                            mirror=MirrorConfig(policy=policy), min_dwell=dwell, print_fn=None)
        sig_info = signal if isinstance(signal, str) else {"kind": signal.kind, "calibration_steps": signal.calibration_steps,
                                                            "calibration_target": signal.calibration_target}
        return model, ctrl, {**info, "signal": sig_info, "mirror_policy": policy, "rank_levels": [4, 8, 16],
                             "lr_mode": "multiplier", "min_dwell": dwell, "scaling": scaling, "lora_alpha": alpha,
                             "scale_by_rank": {r: scaling_for(r, alpha, 16, scaling) for r in (4, 8, 16)}}
    raise ValueError(f"method: unknown {method!r}; choose from {METHODS}")


def resolve_targets(model_path: str, targets: str | None) -> str:
    """The comma list of layers every method adapts: `targets`, or PEFT's default for the model type where it is None.
    A ValueError (one line) when the model cannot be loaded, or a name matches no Linear/Conv1D layer of it: PEFT
    and `setup_unified_lora` adapt what matches and skip the rest, so "c_attn,value" on GPT-2 would adapt c_attn
    alone, and a budget recorded as both would be false."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from unified_lora.model import _is_linear, _matches, default_target_modules

    try:
        cfg = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):  # the module tree without weights
            model = AutoModelForSequenceClassification.from_config(cfg)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_path}: cannot load it ({str(e).strip().splitlines()[0]})") from None
    if targets is None:
        found = default_target_modules(model)
        if isinstance(found, str):  # a regex (PEFT's for a few types): the comma list here cannot hold it
            raise ValueError(f"--targets: PEFT's default for model type {cfg.model_type!r} is the regex {found!r}; "
                             "name the layers with --targets")
        targets = ",".join(found)
    linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
    missing = [t for t in targets.split(",") if not any(_matches(n, [t]) for n in linear)]
    if missing:
        seen = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"--targets: {missing} name no Linear layer of {Path(model_path).name} (model type "
                         f"{cfg.model_type!r}); its Linear layers end with: {seen}")
    return targets


def adapter_shapes(model):
    """[(in, out)] of every adapted Linear."""
    from unified_lora import NestedLoRALayer

    shapes = []
    for m in model.modules():
        if isinstance(m, NestedLoRALayer):
            shapes.append((m.in_features, m.out_features))
        elif hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            shapes.append((m.in_features, m.out_features))  # PEFT's (GPT-2's Conv1D base has no in_features)
    return shapes


def adalora_ranks(model) -> list[int]:
    """Current rank of every AdaLoRA layer = non-zero singular values (lora_E) - what pruning leaves."""
    ranks = []
    for n, p in model.named_parameters():
        if "lora_E" in n:
            ranks.append(int((p.detach() != 0).sum()))
    return ranks


# ----------------------------------------------------------------------------- one run
def shock_window(steps: int, start: float, length: float) -> tuple[int, int]:
    """The shock's steps [first, end) in a `steps`-step run; a ValueError when they are not a non-empty window
    inside the run (the dev metric "just after" is taken at `end`, so the window must end by the last step)."""
    w = (int(steps * start), int(steps * (start + length)))
    if not 0 <= w[0] < w[1] <= steps:
        raise ValueError(f"--shock-start {start:g} --shock-len {length:g} give the window [{w[0]}, {w[1]}) in a "
                         f"{steps}-step run; it must hold at least one step and lie within [0, {steps}]: use "
                         "shock_start >= 0, shock_len > 0 with at least one step, shock_start + shock_len <= 1")
    return w


def run_one(task, method, condition, seed, args) -> dict:
    from transformers import get_linear_schedule_with_warmup

    from unified_lora.data import flip_labels, majority_baseline, primary_metric, symmetric_label_noise
    from unified_lora.training import load_model, trim_padding

    data = load_task(task, args)
    T = args.steps
    clean = data["train_labels"]
    labels = list(clean)
    noise_rate = NOISE.get(condition, 0.0)
    if noise_rate:
        labels = symmetric_label_noise(clean, noise_rate, data["num_labels"], seed=seed)
    enc_train = dict(data["train"], labels=torch.tensor(labels))
    shock = shock_window(T, args.shock_start, args.shock_len) if condition in SHOCKS else None
    shock_kind = "random" if condition == "shockrand" else args.shock_kind

    torch.manual_seed(seed)
    random.seed(seed)
    # as `unified-lora train` loads it: float32 whatever the stored dtype (weights carried to a GPU machine in half
    # precision load upcast), and the tokenizer's pad token id in the config (GPT-2's and Llama's heads read the last
    # token that is not padding; without one they refuse a batch of several rows)
    model = load_model(args.model, "seq-cls", data["num_labels"])[0].to(args.device)
    model, ctrl, info = build(method, model, args, T, data["num_labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if ctrl is not None:
        ctrl.attach_optimizer(opt)
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup * T), T)
    from unified_lora.data import make_loader

    loader = make_loader(enc_train, args.batch_size, shuffle=True, seed=seed, drop_last=True)
    it = iter(loader)
    eval_every = args.eval_every if args.eval_every is not None else (max(3, T // 12) if shock else 0)
    eval_at = set(range(eval_every, T, eval_every)) if eval_every else set()
    if shock:
        eval_at |= {shock[0], shock[1]}  # "just before" (no flipped step yet) and "just after" the window
    curve, losses, ranks, ada_ranks = [], [], [], []
    model.train()
    t0 = time.perf_counter()
    if 0 in eval_at:
        curve.append({"step": 0, **evaluate(model, data["dev"], task)})
    for step in range(T):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = trim_padding(batch)  # (columns that are padding in every row, on either side)
        if shock and shock[0] <= step < shock[1]:
            if shock_kind == "flip":
                batch["labels"] = flip_labels(batch["labels"], data["num_labels"])
            else:  # uniformly random labels, reproducible per (seed, step)
                g = torch.Generator().manual_seed(seed * 100_003 + step)
                batch["labels"] = torch.randint(data["num_labels"], batch["labels"].shape, generator=g)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        out = model(**batch)
        loss = out.loss
        loss.backward()
        if ctrl is not None:
            ctrl.step(loss=loss.item())
            ranks.append(ctrl.rank)
        opt.step()
        sched.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
            ada_ranks.append(adalora_ranks(model))
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if step + 1 in eval_at:
            curve.append({"step": step + 1, **evaluate(model, data["dev"], task)})
    final = evaluate(model, data["dev"], task)
    wall = time.perf_counter() - t0
    curve.append({"step": T, **final})

    shapes = adapter_shapes(model)
    per_rank = sum(i + o for i, o in shapes)  # adapter params per unit of rank over all layers
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    res: dict = {"task": task, "method": method, "condition": condition, "seed": seed, "tag": args.tag,
                 "metrics": final, "primary_metric": primary_metric(task), "curve": curve,
                 "majority_baseline": majority_baseline(clean, data["dev_labels"], task),
                 "wall_time_s": wall, "train_loss": losses, "info": info, "n_adapted_layers": len(shapes),
                 "head_params": head}
    if method.startswith("lora_r"):
        r = info["rank"]
        res.update(mean_active_rank=r, adapter_params_active=r * per_rank, adapter_params_allocated=r * per_rank)
    elif method == "adalora":
        per_layer = [sum(r) / len(r) for r in ada_ranks]
        final_ranks = ada_ranks[-1]
        pattern = model.peft_config["default"].rank_pattern or {}
        # P, E and Q of each kept triplet: (in + out + 1) per unit of rank, layer by layer
        params_per_step = [sum(r * (i + o + 1) for r, (i, o) in zip(rs, shapes)) for rs in ada_ranks]
        res.update(mean_active_rank=sum(per_layer) / len(per_layer),
                   final_rank_per_layer=final_ranks, final_mean_rank=sum(final_ranks) / len(final_ranks),
                   rank_pattern_final={k: int(sum(v)) for k, v in pattern.items()},
                   pruned=bool(sum(final_ranks) < 12 * len(final_ranks)),
                   mean_rank_per_step=[round(x, 3) for x in per_layer],
                   # over the run, as mean_active_rank and the other methods' counts are; the last step's apart
                   adapter_params_active=round(sum(params_per_step) / len(params_per_step)),
                   adapter_params_final=params_per_step[-1],
                   adapter_params_allocated=12 * sum(i + o + 1 for i, o in shapes))
    else:
        tr = ctrl.trace
        modes = [r.mode for r in tr]
        mean_rank = sum(ranks) / len(ranks)
        res.update(mean_active_rank=mean_rank, adapter_params_active=round(mean_rank * per_rank),
                   adapter_params_allocated=16 * per_rank, ranks=ranks,
                   phi=[round(r.phi, 4) for r in tr],
                   mode_fraction={m: modes.count(i) / len(modes) for i, m in enumerate(("SINGLE", "MULTI", "MIRROR"))},
                   loss_scale_final=tr[-1].components.get("loss_scale") if tr else None,
                   transitions=[{"step": r.step, "transition": r.transition, "phi": r.phi, "snapshot": r.snapshot,
                                 "drift": r.drift} for r in tr if r.transition])
    if shock:
        by_step = {c["step"]: c for c in curve}
        pm = primary_metric(task)
        res["shock"] = {"kind": shock_kind, "window": list(shock), "before": by_step[shock[0]][pm], "after": by_step[shock[1]][pm],
                        "end": final[pm]}
    res["config"] = run_config(args)
    if torch.device(args.device).type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(args.device)
    res["noise"] = {"rate": noise_rate, "observed": sum(a != b for a, b in zip(clean, labels)) / len(clean)}
    res["utc_finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        res["loadavg_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        pass
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model path (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--tasks", default="mrpc,rte,cola,sst2")
    ap.add_argument("--methods", default="lora_r4,lora_r8,lora_r16,adalora,unified_v1,unified_v3")
    ap.add_argument("--conditions", default="clean,noise20,noise40,shock")
    ap.add_argument("--seeds", default=None, help="comma list (default 0,1,2; shock 0-4)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="base LR, tuned once for lora_r8 and reused")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=0.06, help="linear warmup fraction, then linear decay")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--targets", default=None,
                    help="comma list of the Linear layers to adapt, by name suffix (default: PEFT's targets for the "
                         "model type: query,value on BERT and MiniLM, c_attn on GPT-2, q_proj,v_proj on Llama); "
                         "each must name a layer of the model")
    ap.add_argument("--adalora-orth-reg", type=float, default=0.5,
                    help="AdaLoRA orthogonal-regulariser weight (PEFT default 0.5; the AdaLoRA paper's GLUE runs use 0.1)")
    ap.add_argument("--shock-start", type=float, default=0.4, help="fraction of steps")
    ap.add_argument("--shock-len", type=float, default=0.2, help="fraction of steps")
    ap.add_argument("--shock-kind", choices=("flip", "random"), default="flip",
                    help="the `shock` condition's corruption: flip every label (adversarial) or draw labels uniformly "
                         "at random (the `shockrand` condition always draws them at random)")
    ap.add_argument("--eval-every", type=int, default=None, help="dev eval interval (default: end only; shock T/12)")
    ap.add_argument("--sst2-train-size", type=int, default=8000, help="SST-2 train subsample (fixed, seed 1234)")
    ap.add_argument("--data-dir", default=None, help="GLUE root (default: unified_lora.data resolution)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (keep a grid on one device: use its own --out)")
    ap.add_argument("--shard", default=None, help="i/n: run only jobs i, i+n, i+2n, ... (parallel workers)")
    ap.add_argument("--claim", default=None, metavar="DIR",
                    help="parallel workers on one grid: a worker takes a job by creating DIR/<run>.claim "
                         "(O_EXCL, holding its process id) and skips jobs another live worker has claimed, so the "
                         "work balances itself; a dead worker's claim is taken over. Use a machine-local DIR shared "
                         "by the sitting's workers")
    ap.add_argument("--tag", default="", help="suffix for run names (e.g. an LR probe)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--force", action="store_true", help="re-run finished runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 train / 48 dev examples, 6 steps, 32 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.max_length = min(args.steps, 6), min(args.max_length, 32)
    if args.model is None:
        from unified_lora.data import default_model_path

        args.model = default_model_path()
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:  # before the budget check, which compares the targets a run recorded
        args.targets = resolve_targets(args.model, args.targets)
    except ValueError as e:
        ap.error(str(e))
    args.model_fingerprint = model_fingerprint(args.model)  # (recorded in each run's config, with the budget)
    runs_dir = Path(args.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for m in args.methods.split(","):
        if m.startswith("unified_"):
            try:
                parse_unified(m)
            except ValueError as e:
                ap.error(f"--methods: {e}")
        elif m not in METHODS and not (m.startswith("lora_r") and m[len("lora_r"):].isdigit()):
            ap.error(f"--methods: unknown {m!r}; choose from {METHODS}")
    for c in args.conditions.split(","):
        if c not in CONDITIONS:
            ap.error(f"--conditions: unknown {c!r}; choose from {CONDITIONS}")
    if any(c in SHOCKS for c in args.conditions.split(",")):
        try:  # before anything runs: a window past the end used to fail only after the whole run had trained
            shock_window(args.steps, args.shock_start, args.shock_len)
        except ValueError as e:
            ap.error(str(e))
    # Seed-major order: an interrupted sitting leaves whole seeds of every cell, not whole cells of one seed.
    jobs = []
    for task in args.tasks.split(","):
        for condition in args.conditions.split(","):
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(SEEDS_WANTED[condition]))
            jobs += [(seed, task, condition, method) for seed in seeds for method in args.methods.split(",")]
    jobs.sort(key=lambda j: j[0])  # stable: keeps task / condition / method order within a seed
    check_budgets(runs_dir, jobs, args)
    if args.shard:  # "i/n": this process takes every n-th job from the i-th (parallel workers on one grid)
        i, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= i < n:
            ap.error(f"--shard {args.shard}: need 0 <= i < n")
        jobs = jobs[i::n]
    claims = Path(args.claim) if args.claim else None
    if claims:
        claims.mkdir(parents=True, exist_ok=True)
    code = git_commit()  # the code this process imported, recorded in each run it writes (runs before this have none)
    done = 0
    for seed, task, condition, method in jobs:
        name = run_name(task, method, condition, seed, args.tag)
        path = runs_dir / f"{name}.json"
        finished = path.exists() and not args.force
        if claims and not finished and not take_claim(claims, name):
            print(f"skip {name} (claimed by another worker)", flush=True)
            continue
        if finished:  # its budget was checked against this command's before anything ran
            print(f"skip {name} (done)", flush=True)
            continue
        res = run_one(task, method, condition, seed, args)
        res["command"] = "python benchmarks/quality/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
        res.update(code)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: parallel workers never share one
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(path)
        done += 1
        pm = res["primary_metric"]
        print(f"{name}: {pm}={res['metrics'][pm]:.4f} mean_rank={res['mean_active_rank']:.2f} "
              f"wall={res['wall_time_s']:.0f}s", flush=True)
    print(f"{done} run(s) written to {runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
