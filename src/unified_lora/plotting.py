"""Plot a controller trace: loss, φ with the θ0/θ1 bands, mode and rank, learning rate, and a multi-task trace's
gradient conflict (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from ._files import written_atomically  # noqa: E402

MODE_COLORS = ("#4c9f70", "#4a7fc1", "#d0584f")  # SINGLE, MULTI, MIRROR


def _series(trace: Sequence[dict], key: str) -> list[float]:
    out = []
    for r in trace:
        v = r.get(key)
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def _component(trace: Sequence[dict], key: str) -> list[float]:
    """A trace component per step (NaN where a step did not record it, or recorded no number)."""
    return _series([r.get("components") or {} for r in trace], key)


def _ema(xs: list[float], rate: float = 0.1) -> list[float]:
    out, m = [], None
    for x in xs:
        if x == x:  # skip NaN
            m = x if m is None else (1 - rate) * m + rate * x
        out.append(m if m is not None else float("nan"))
    return out


def _plot_conflict(ax, trace: Sequence[dict], steps: list[float], conflict: dict[str, list[float]]) -> None:
    """The multi-task panel: the gradient conflict the signal read (C_grad), the plain cosine conflict (C_grad_raw,
    dashed, where it differs: grad_noise="debias"), and each task's gradient reliability ρ (thin, dotted)."""
    grad, raw = conflict.get("C_grad"), conflict.get("C_grad_raw")
    if grad is not None:
        ax.plot(steps, grad, color="#b15928", lw=1.4, label="C_grad")
    if raw is not None and (grad is None or any(a != b and (a == a or b == b) for a, b in zip(grad, raw))):
        ax.plot(steps, raw, color="#b15928", lw=1.0, ls="--", label="C_grad_raw (plain cosine)")
    tasks = dict.fromkeys(k[4:-1] for r in trace for k in (r.get("components") or {})
                          if k.startswith("rho[") and k.endswith("]"))
    for task in tasks:
        ax.plot(steps, _component(trace, f"rho[{task}]"), lw=0.9, ls=":", label=f"ρ[{task}]")
    ax.set_ylim(0, 1)
    ax.set_ylabel("gradient conflict\n(ρ: reliability)")
    ax.legend(loc="upper right", fontsize=7, ncol=2)


def plot_trace(trace: Sequence[dict], out_path: str | os.PathLike, *, theta0: float = 0.3, theta1: float = 0.7,
               shock: tuple[int, int] | None = None, baseline: Sequence[dict] | None = None,
               title: str | None = None) -> str:
    """Write a 4-panel PNG of a trace (list of StepRecord dicts, e.g. from read_trace) and return its path; a
    multi-task trace gets a fifth panel, its gradient conflict (C_grad, the plain cosine C_grad_raw where it differs,
    and each task's gradient reliability ρ). The
    format is the path's extension, as matplotlib's `savefig` takes it (`.svg`, `.pdf`, ...; none: `.png` is added,
    and the path returned has it). The file is written under a temporary name beside it, flushed to the disk and
    renamed (`written_atomically`): an interrupted or killed plot leaves the previous file whole, never a cut-short
    one."""
    if not trace:
        raise ValueError("trace: empty; nothing to plot (was the run at least one step long?)")
    out_path = os.fspath(out_path)
    fmt = os.path.splitext(out_path)[1][1:].lower()
    if not fmt:  # as savefig names it: "phi" is written to "phi.png"
        fmt = matplotlib.rcParams["savefig.format"]
        out_path = f"{out_path.rstrip('.')}.{fmt}"
    steps = _series(trace, "step")
    conflict = {key: _component(trace, key) for key in ("C_grad", "C_grad_raw")}
    conflict = {key: v for key, v in conflict.items() if any(x == x for x in v)}  # (a multi-task trace's)
    heights = [3, 3, 2, 2] + [2] * bool(conflict)
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, 9 + 2 * bool(conflict)), sharex=True,
                             gridspec_kw={"height_ratios": heights})
    ax_loss, ax_phi, ax_mode, ax_lr = axes[:4]

    loss = _series(trace, "loss")
    ax_loss.plot(steps, loss, color="#999999", lw=0.7, alpha=0.6, label="loss (per step)")
    ax_loss.plot(steps, _ema(loss), color="black", lw=1.5, label="loss EMA(0.1) - unified")
    if baseline:
        ax_loss.plot(_series(baseline, "step"), _ema(_series(baseline, "loss")), color="#e08a2c", lw=1.5,
                     label="loss EMA(0.1) - baseline LoRA r8")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(loc="upper right", fontsize=8)

    ax_phi.axhspan(0, theta0, color=MODE_COLORS[0], alpha=0.10, lw=0)
    ax_phi.axhspan(theta0, theta1, color=MODE_COLORS[1], alpha=0.10, lw=0)
    ax_phi.axhspan(theta1, 1, color=MODE_COLORS[2], alpha=0.10, lw=0)
    for th, name in ((theta0, "θ0"), (theta1, "θ1")):
        ax_phi.axhline(th, color="#555555", ls="--", lw=0.8)
        ax_phi.text(steps[0], th + 0.01, f"{name}={th:g}", fontsize=8, color="#555555")
    ax_phi.plot(steps, _series(trace, "phi"), color="#6a3d9a", lw=1.6, label="φ(t)")
    ax_phi.set_ylim(0, 1)
    ax_phi.set_ylabel("stress φ")
    ax_phi.text(1.005, theta0 / 2, "SINGLE", transform=ax_phi.get_yaxis_transform(), fontsize=7, va="center")
    ax_phi.text(1.005, (theta0 + theta1) / 2, "MULTI", transform=ax_phi.get_yaxis_transform(), fontsize=7,
                va="center")
    ax_phi.text(1.005, (theta1 + 1) / 2, "MIRROR", transform=ax_phi.get_yaxis_transform(), fontsize=7, va="center")

    modes = [int(m) for m in _series(trace, "mode")]
    ranks = _series(trace, "rank")
    ax_mode.step(steps, ranks, where="post", color="black", lw=1.4, label="rank")
    for i, (s, m) in enumerate(zip(steps, modes)):
        nxt = steps[i + 1] if i + 1 < len(steps) else s + 1
        ax_mode.axvspan(s, nxt, color=MODE_COLORS[m], alpha=0.25, lw=0)
    ax_mode.set_ylabel("rank\n(bg: mode)")
    ax_mode.set_ylim(0, max(ranks) * 1.25 if ranks else 1)

    lrs = _series(trace, "lr")
    ax_lr.step(steps, lrs, where="post", color="#1f78b4", lw=1.4)
    if all(v > 0 for v in lrs if v == v):
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    if conflict:
        _plot_conflict(axes[4], trace, steps, conflict)
    axes[-1].set_xlabel("step")

    for r in trace:  # Mirror events
        if r.get("snapshot"):
            for ax in axes:
                ax.axvline(r["step"], color=MODE_COLORS[2], lw=0.8, ls=":")
            ax_phi.annotate(f"snapshot {r['snapshot']}", (r["step"], 0.95), fontsize=7, rotation=90, va="top",
                            ha="right", color=MODE_COLORS[2])
    for r in trace:  # multi-task splits within resplit_window of their merge: MULTI held until the back-off ends
        comps = r.get("components") or {}
        if comps.get("tasks_back"):
            for ax in axes:
                ax.axvline(r["step"], color=MODE_COLORS[1], lw=0.8, ls=":")
            ax_phi.text(r["step"], 0.97, f" task adapters back, no merge before step {comps['merge_held_until']}",
                        fontsize=7, va="top", ha="left", color=MODE_COLORS[1], clip_on=True)
    said = set()
    for r in trace:  # multi-task merges held at the run's end (its last resplit_window steps): the first held step
        closed = (r.get("components") or {}).get("merge_closed_from")
        if closed is not None and closed not in said:
            said.add(closed)
            for ax in axes:
                ax.axvline(r["step"], color=MODE_COLORS[0], lw=0.8, ls=":")
            # (to the line's left: the held steps end the run)
            ax_phi.text(r["step"], 0.03, f"merge held: none from step {closed} on, too close to the run's end ",
                        fontsize=7, va="bottom", ha="right", color=MODE_COLORS[0], clip_on=True)
    if shock and shock[1] > shock[0]:
        for ax in axes:
            ax.axvspan(shock[0], shock[1], color="#f2c14e", alpha=0.25, lw=0)
        ax_loss.text(shock[0], 1.0, " shock (corrupted labels)", transform=ax_loss.get_xaxis_transform(),
                     fontsize=8, va="bottom")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    try:  # the format given, as the temporary name's extension is not the path's
        with written_atomically(out_path) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
    return out_path
