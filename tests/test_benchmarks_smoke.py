"""Smoke tests for the benchmark harnesses: each runs end to end in --quick mode on tiny inputs
and writes its JSON + Markdown. No timing asserts: speed is what the scripts measure, not test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import can_build_cpp, load_benchmark



@pytest.fixture(scope="module")
def quality_out(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    run = load_benchmark("quality/run.py")
    rc = run.main(["--quick", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods",
                   "lora_r8,adalora,unified_v1,unified_v1c_never", "--conditions", "clean,shock", "--seeds", "0",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_quality_run_writes_one_json_per_cell(quality_out):
    names = sorted(p.name for p in (quality_out / "runs").glob("*.json"))
    assert names == sorted(f"mrpc__{m}__{c}__s0.json" for m in ("lora_r8", "adalora", "unified_v1", "unified_v1c_never")
                           for c in ("clean", "shock"))
    v1c = json.loads((quality_out / "runs" / "mrpc__unified_v1c_never__shock__s0.json").read_text())
    assert v1c["info"]["signal"] == {"kind": "loss", "calibration_steps": 20, "calibration_target": 2.2}
    assert v1c["info"]["mirror_policy"] == "never"
    res = json.loads((quality_out / "runs" / "mrpc__unified_v1__clean__s0.json").read_text())
    assert set(res["metrics"]) == {"f1", "accuracy"}
    assert res["majority_baseline"]["f1"] > 0 and len(res["train_loss"]) == 6 and res["command"]
    # the code it ran: the checkout's commit, and whether the checkout differed from it (a run JSON had neither)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert res["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(res["dirty"], bool) if res["commit"] else res["dirty"] is None


def test_git_commit_names_head_and_whether_the_checkout_differs_from_it(tmp_path):
    """`_common.git_commit`, which the quality and multi-task runs record: HEAD's short hash; dirty where a tracked
    file changed or an unignored file was added, not for what the runs write under benchmarks/results/; None for
    both outside a git checkout."""
    git_commit = load_benchmark("_common.py").git_commit
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert git_commit(repo) == {"commit": None, "dirty": None}  # not a checkout yet
    git("init", "-q")
    git("add", "code.py")
    git("commit", "-q", "-m", "c")
    head = git("rev-parse", "--short", "HEAD")
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "benchmarks" / "results" / "run.json").write_text("{}\n")  # a run's output
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "new.py").write_text("y = 2\n")
    assert git_commit(repo) == {"commit": head, "dirty": True}
    (repo / "new.py").unlink()
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == {"commit": head, "dirty": True}


def test_adalora_run_records_a_pruned_rank_pattern(quality_out):
    res = json.loads((quality_out / "runs" / "mrpc__adalora__clean__s0.json").read_text())
    assert res["pruned"] and len(res["rank_pattern_final"]) == res["n_adapted_layers"] == 4
    assert res["final_mean_rank"] < 12


def test_shock_run_records_before_after_and_end(quality_out):
    res = json.loads((quality_out / "runs" / "mrpc__lora_r8__shock__s0.json").read_text())
    assert set(res["shock"]) == {"kind", "window", "before", "after", "end"} and res["shock"]["kind"] == "flip"
    steps = [c["step"] for c in res["curve"]]
    assert res["shock"]["window"][0] in steps and res["shock"]["window"][1] in steps


def test_finished_runs_are_skipped(quality_out, tiny_model_dir, capsys):
    path = quality_out / "runs" / "mrpc__lora_r8__clean__s0.json"
    before = path.stat().st_mtime_ns
    load_benchmark("quality/run.py").main(["--quick", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods",
                                  "lora_r8", "--conditions", "clean", "--seeds", "0", "--out", str(quality_out)])
    assert path.stat().st_mtime_ns == before
    assert "skip mrpc__lora_r8__clean__s0" in capsys.readouterr().out


def test_report_builds_quality_md_with_baseline_and_plots(quality_out):
    assert load_benchmark("quality/report.py").main(["--runs", str(quality_out / "runs"), "--out", str(quality_out)]) == 0
    md = (quality_out / "quality.md").read_text()
    assert "Majority-class baseline" in md and "| clean | adalora | 1 |" in md
    assert (quality_out / "quality_plots" / "mrpc_shock.png").stat().st_size > 0
    # one noise rate (clean only) is no curve: no noise plot, and none referenced
    assert not (quality_out / "quality_plots" / "mrpc_noise.png").exists() and "mrpc_noise" not in md


def test_noise_plot_is_drawn_from_two_noise_rates(tmp_path):
    rep = load_benchmark("quality/report.py")
    runs = [_fake_run("mrpc", m, c, s, v) for s in range(3) for m in ("lora_r8", "unified_v1")
            for c, v in (("clean", 0.85), ("noise40", 0.80))]
    runs += [_fake_run("mrpc", "unified_v1_fs", "clean", s, 0.84) for s in range(3)]  # one rate: no curve
    assert rep.noise_curve_methods(rep.group(runs), "mrpc") == ["lora_r8", "unified_v1"]
    made = rep.make_plots(runs, tmp_path)
    assert made["mrpc_noise"] == "quality_plots/mrpc_noise.png"
    assert (tmp_path / made["mrpc_noise"]).stat().st_size > 0


@pytest.fixture(scope="module")
def layer_variants_quick(tmp_path_factory):
    """One `perf/layer_variants.py --quick` run, shared by the tests that read it: (its payload, its results dir)."""
    out = tmp_path_factory.mktemp("layer_variants")
    return load_benchmark("perf/layer_variants.py").main(["--quick", "--results-dir", str(out)]), out


@pytest.mark.parametrize("script", ["perf/layer.py", "perf/controller_overhead.py", "perf/mirror_cost.py",
                                    "perf/layer_variants.py", "perf/checkpoint_io.py"])
def test_perf_script_quick_writes_json_and_markdown(script, tmp_path, request):
    if script == "perf/layer_variants.py":  # (the run the cpp test below reads too)
        payload, tmp_path = request.getfixturevalue("layer_variants_quick")
    else:
        payload = load_benchmark(script).main(["--quick", "--results-dir", str(tmp_path)])
    stem = "perf_" + Path(script).stem + "_quick"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["command"] and "under_contention" in saved["load"]
    assert f"<!-- {stem} -->" in (tmp_path / "perf.md").read_text()
    assert payload["benchmark"] == saved["benchmark"]
    if script == "perf/layer.py":  # the tiny shape is the host-overhead proxy: no met/missed verdict
        md = (tmp_path / "perf.md").read_text()
        assert "| host-overhead proxy, no target |" in md and "| missed |" not in md and "| met |" not in md
    if script == "perf/controller_overhead.py":
        # v1's ctrl.step (the loss signal, no transition) issues no tensor op, so no kernel on a GPU: a check of the
        # gradients at each call, for the accumulation warning's sake, once issued 54 on MiniLM
        assert saved["arms"]["v1"]["aten_ops_per_ctrl_step"] == 0, saved["arms"]["v1"]
    if script == "perf/checkpoint_io.py":  # every arm wrote a folder; an adapter-only one holds no base weights
        b, t = saved["bytes"], saved["time_s"]
        assert all(t[a]["n"] == saved["repeats"] and t[a]["median"] > 0 for a in t)
        assert b["export"] > 0 and b["adapter_only"] < 0.05 * b["whole"], b


def test_lockstep_cost_quick_times_both_arms_over_two_gloo_processes(tmp_path):
    """(A script run, not load_benchmark: its worker is spawned into 2 processes, which import it by name.)"""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "lockstep_cost.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--results-dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    saved = json.loads((tmp_path / "perf_lockstep_cost_quick.json").read_text())
    assert saved["world_size"] == 2 and "<!-- perf_lockstep_cost_quick -->" in (tmp_path / "perf.md").read_text()
    assert all(saved[w]["ratio"]["n"] == saved["repeats"] and saved[w]["plain_s"]["median"] > 0
               for w in ("reduction", "step"))


@pytest.fixture(scope="module")
def e2e_quick(tmp_path_factory):
    """One e2e.py --quick run of the default arms, and of the _cpp arm beside them where it can be built, for both
    tests below (each arm is a fresh process: one run instead of two that each started unified and peft_r8)."""
    e2e, out = load_benchmark("perf/e2e.py"), tmp_path_factory.mktemp("e2e")
    arms = list(e2e.ARMS) + (["unified_cpp"] if can_build_cpp() else [])
    return e2e.main(["--quick", "--arms", ",".join(arms), "--results-dir", str(out)]), out, e2e.ARMS


@pytest.mark.slow
def test_e2e_quick_runs_every_arm_in_its_own_process(e2e_quick):
    payload, _, default_arms = e2e_quick
    assert default_arms == ("unified", "peft_r8", "peft_r16")  # what a run without --arms times
    assert set(payload["summary"]) - {"unified_cpp"} == {"unified", "peft_r8", "peft_r16"}
    assert all(r[0]["vm_hwm_bytes"] > 0 for r in payload["runs"].values())


@pytest.mark.slow
@pytest.mark.skipif(not can_build_cpp(), reason="the _cpp arm builds csrc/nested_path.cpp: needs g++ and ninja")
def test_e2e_cpp_arm_gets_its_own_ratios_beside_the_default_arm(e2e_quick):
    payload, tmp_path, _ = e2e_quick
    assert set(payload["ratios_by_arm"]) == {"unified", "unified_cpp"}
    assert payload["ratios"] == payload["ratios_by_arm"]["unified"]
    assert payload["summary"]["unified_cpp"]["mean_rank"] == payload["summary"]["unified"]["mean_rank"]
    assert "`unified_cpp`, time vs peft r8:" in (tmp_path / "perf.md").read_text()


@pytest.mark.slow
def test_profile_e2e_quick_splits_the_step_and_diffs_the_ops(tmp_path):
    # every op in the diff (--top): the nested path's few µs can rank below the noise of busier ops under load
    payload = load_benchmark("perf/profile_e2e.py").main(["--quick", "--arms", "unified_v1,peft_r8#aa,peft_r8",
                                                 "--top", "100000", "--results-dir", str(tmp_path)])
    ours, base = payload["summary"]["unified_v1"], payload["summary"]["peft_r8"]
    # nested blocks: 2 layers x (query, value) x 3 levels x (A, B) + classifier weight and bias; PEFT: 2 x 2 x 2 + 2
    assert (ours["trainable_tensors"], base["trainable_tensors"]) == (26, 10)
    # "#aa" runs the baseline arm again under another name (the A/A control), with its own ratio
    assert payload["summary"]["peft_r8#aa"]["trainable_tensors"] == 10 and set(payload["ratios"]) == {
        "unified_v1", "peft_r8#aa"}
    assert all(r["gc_ms_per_step"] >= 0 and len(r["gc_collections_by_generation"]) == 3 for r in payload["runs"])
    assert ours["phase_ms"]["controller"]["median"] > 0 and ours["self_cpu_ms"]["median"] > 0
    ops = {r["op"]: r for r in payload["ops_diff_by_name"]}
    nested = [ops[k] for k in ("_NestedLoRAPath", "_NestedLoRAPathBackward") if k in ops]
    assert nested and all(r["ours_calls"] > 0 and r["base_calls"] == 0 for r in nested)  # only ours runs the path
    assert "<!-- perf_profile_e2e_quick -->" in (tmp_path / "perf.md").read_text()


@pytest.mark.slow
def test_profile_e2e_interleaved_pairs_every_arm_with_the_baseline_in_one_process(tmp_path):
    payload = load_benchmark("perf/profile_e2e.py").main(["--quick", "--interleaved", "--arms", "unified,unified_v1,peft_r8",
                                                 "--results-dir", str(tmp_path)])
    assert set(payload["ratios"]) == {"unified", "unified_v1"}  # the baseline (last arm) gets no ratio
    steps = payload["setup"]["steps"]
    for arm, s in payload["summary"].items():
        assert s["step_ms"]["n"] == steps and s["phase_ms"]["forward"]["median"] > 0
    # the v3 composite signal reads gradients: its ctrl.step costs more than v1's loss-only step
    assert payload["summary"]["unified"]["phase_ms"]["controller"]["median"] > \
        payload["summary"]["unified_v1"]["phase_ms"]["controller"]["median"]
    assert "<!-- perf_profile_e2e_interleaved_quick -->" in (tmp_path / "perf.md").read_text()


def test_a_finished_run_with_another_budget_is_refused(quality_out, tiny_model_dir):
    with pytest.raises(SystemExit, match="different budget"):
        load_benchmark("quality/run.py").main(["--quick", "--steps", "5", "--model", str(tiny_model_dir), "--tasks", "mrpc",
                                      "--methods", "lora_r8", "--conditions", "clean", "--seeds", "0",
                                      "--out", str(quality_out)])


JIT = (0.002, -0.002, 0.0)  # a per-seed wobble of mean 0 for _fake_run's values (see its first use)


def _fake_run(task, method, cond, seed, value, rank=8.0, shock=None, mirror=0.0, snaps=()):
    pm = {"mrpc": "f1", "sst2": "accuracy", "rte": "accuracy", "cola": "mcc"}[task]
    metrics = {"f1": value, "accuracy": value} if task == "mrpc" else {pm: value}
    r = {"task": task, "method": method, "condition": cond, "seed": seed, "tag": "", "metrics": metrics,
         "primary_metric": pm, "mean_active_rank": rank, "majority_baseline": {pm: 0.0},
         "mode_fraction": {"SINGLE": 0.0, "MULTI": 1.0 - mirror, "MIRROR": mirror},
         "transitions": [{"step": 4 + i, "snapshot": s,
                          "transition": "MULTI->MIRROR" if s == "saved" else "MIRROR->MULTI"}
                         for i, s in enumerate(snaps)], "config": {"steps": 10}}
    if shock:
        r["shock"] = dict(zip(("before", "after", "end"), shock), window=[4, 6])
    return r


def test_shock_points_in_the_secondary_metric_come_from_the_dev_curve():
    rep = load_benchmark("quality/report.py")
    r = _fake_run("mrpc", "lora_r8", "shock", 0, 0.81, shock=(0.83, 0.0, 0.81))
    r["curve"] = [{"step": 2, "f1": 0.82, "accuracy": 0.70}, {"step": 4, "f1": 0.83, "accuracy": 0.73},
                  {"step": 6, "f1": 0.0, "accuracy": 0.32}, {"step": 8, "f1": 0.81, "accuracy": 0.71}]
    r["metrics"] = {"f1": 0.81, "accuracy": 0.71}
    assert [rep._at_shock(r, pt, "accuracy") for pt in ("before", "after", "end")] == [0.73, 0.32, 0.71]
    r["curve"] = r["curve"][:2]  # no evaluation at the window's end
    with pytest.raises(ValueError, match="no dev accuracy at step 6"):
        rep._at_shock(r, "after", "accuracy")


def test_a_cell_whose_seeds_ran_on_two_devices_says_so_and_splits_the_wall_time():
    rep = load_benchmark("quality/report.py")
    runs = [_fake_run("cola", "lora_r8", "clean", s, 0.1 * s) for s in range(3)]
    for r, (dev, wall) in zip(runs, [("cuda", 30.0), ("cuda", 40.0), ("cpu", 1500.0)]):
        r["config"]["device"], r["wall_time_s"], r["device_name"] = dev, wall, "H100" if dev == "cuda" else None
    assert rep.device_cells(runs) == ("1500 (CPU); 35 (H100)", "seeds by device: CPU s2; H100 s0,s1")
    assert rep.device_label(runs) == "CPU, H100"
    assert rep.device_cells(runs[:2]) == ("35", "")  # one device: as before, no note
    for r in runs:
        r.update(adapter_params_active=10, adapter_params_allocated=10)
        r["config"].update(model="m", batch_size=16, max_length=128, lr=1e-3, warmup=0.06, targets="query,value",
                           lora_alpha=16.0)
    row = next(line for line in rep.render(runs, {}, rep.REPO).splitlines() if line.startswith("| clean | lora_r8"))
    assert row.endswith("| 1500 (CPU); 35 (H100) | seeds by device: CPU s2; H100 s0,s1 |")


def test_share_of_the_shock_window_in_mirror_comes_from_the_transitions():
    rep = load_benchmark("quality/report.py")
    r = _fake_run("mrpc", "unified_v3", "shock", 0, 0.8, shock=(0.8, 0.1, 0.7))
    r["shock"]["window"], r["config"]["steps"] = [10, 30], 50

    def tr(*steps_modes):
        return [{"step": k, "transition": t, "snapshot": None} for k, t in steps_modes]

    r["transitions"] = tr((5, "MULTI->MIRROR"), (12, "MIRROR->MULTI"),  # 2 of its steps in the window
                          (20, "MULTI->MIRROR"), (25, "MIRROR->SINGLE"),  # 5
                          (28, "SINGLE->MIRROR"))  # open to the end: 2 (28, 29)
    assert rep._mirror_share_of_window(r) == pytest.approx(9 / 20)
    assert [e[:2] for e in rep._shock_episodes(r)] == [(5, 12), (20, 25), (28, 50)]
    r["transitions"] = tr((2, "MULTI->MIRROR"), (9, "MIRROR->MULTI"))  # before the window: not the shock's episode
    assert rep._shock_episodes(r) == [] and rep._mirror_share_of_window(r) == 0.0
    r["transitions"] = tr((30, "MULTI->MIRROR"), (40, "MIRROR->MULTI"))  # right after the window: none of it
    assert rep._mirror_share_of_window(r) == 0.0
    # the claim counts only the shock's episodes: a restore before the window is not a stress->recovery cycle
    runs = [_fake_run("mrpc", "lora_r8", "shock", s, 0, shock=(0.8, 0.1, 0.7 + 0.01 * s)) for s in range(3)]
    for s in range(3):
        ours = _fake_run("mrpc", "unified_v3", "shock", s, 0, shock=(0.8, 0.1, 0.8 + 0.012 * s), mirror=0.2)
        ours["transitions"] = tr((1, "MULTI->MIRROR"), (3, "MIRROR->MULTI"))
        ours["transitions"][1]["snapshot"] = "restored"
        runs.append(ours)
    md = "\n".join(rep.render_claims(runs))
    assert "| mrpc shock | unified_v3 | 3 | 0/3 | 0% (0%–0%) | 0 / 0 |" in md
    assert "in MIRROR during the window in 0/3 runs, restored in 0/3" in md  # full recovery, yet not a "yes":
    assert "Reproduced: **partly" in md and "Reproduced: **yes" not in md  # the Mirror did nothing in the window
    r["transitions"] = [{"step": 12, "snapshot": "saved"}]  # an old record without modes: refused, not guessed
    with pytest.raises(ValueError, match="without its step and modes"):
        rep._mirror_share_of_window(r)


def test_claim_verdicts_are_computed_from_the_runs():
    rep = load_benchmark("quality/report.py")
    runs = []
    # (JIT: a seed-to-seed wobble of mean 0, so that no pair differs by the same amount on every seed, which has no
    # spread to test against and gets no verdict)
    for s, (base, ours) in enumerate([(0.80, 0.702), (0.81, 0.708), (0.79, 0.69)]):  # ours clearly worse on SST-2
        runs += [_fake_run("sst2", "lora_r8", "clean", s, base), _fake_run("sst2", "unified_v1", "clean", s, ours, 4.0)]
    for s, (base, ours) in enumerate([(0.50, 0.85), (0.52, 0.86), (0.48, 0.84)]):  # +35 F1 points under noise
        runs += [_fake_run("mrpc", "lora_r8", "noise40", s, base), _fake_run("mrpc", "unified_v1", "noise40", s, ours)]
    for s in range(3):
        runs += [_fake_run("sst2", "lora_r8", "shock", s, 0, shock=(0.8, 0.5, 0.6 + 0.01 * s + JIT[s])),
                 _fake_run("sst2", "unified_v1c", "shock", s, 0, shock=(0.8, 0.7 + 0.01 * s, 0.8 + 0.01 * s), mirror=0.2,
                           snaps=("saved", "restored"))]
    md = "\n".join(rep.render_claims(runs))
    assert "| sst2 | unified_v1 | -0.100 ± " in md and "| worse |" in md and "+50% / +75%" in md
    assert "Claim reproduced: **no**" in md  # one task, and worse there
    # a task where lora_r8 itself stays at the majority-class floor: "equal" there is not counted for the claim
    floor = [_fake_run("rte", m, "clean", s, 0.53 + 0.01 * (s - 1) * (m == "lora_r8"), 4.0 if m != "lora_r8" else 8.0)
             for s in range(3) for m in ("lora_r8", "unified_v1")]
    for r in floor:
        r["majority_baseline"] = {"accuracy": 0.527}
    fmd = "\n".join(rep.render_claims(runs + floor))
    assert "| rte | unified_v1 | +0.000 ± 0.006 (accuracy) | equal (|Δ| ≤ t·SE); at the floor: lora_r8 is not" in fmd
    assert "equal or better on 0/2 tasks measured (none), not counted where lora_r8 itself is at the" in fmd
    assert "floor (rte)" in fmd
    for r in floor:
        r["majority_baseline"] = {"accuracy": 0.5}  # 0.53 ± 0.01 over 3 seeds: 5.2 SE above 0.5 (t(0.975, 2) = 4.30)
    fmd = "\n".join(rep.render_claims(runs + floor))
    assert "at the floor" not in fmd and "equal or better on 1/2 tasks measured (rte)" in fmd
    assert "unified_v1 +35.0 points" in md and "Claim (+31 points) reproduced: **yes**" in md
    assert ("| sst2 shock | unified_v1c | 3 | 3/3 | 50% (50%–50%) | 3 / 0 | +0.010 ± 0.010 | r8 +0.200 ± 0.001 better "
            "| yes |") in md  # the same seeds: paired, and the difference nearly the same on every seed
    assert "**sst2 shock unified_v1c**" in md and "better than every fixed LoRA rank measured (lora_r8)" in md
    # the drop in the window (after − before): −0.09 against −0.30, the exploratory comparison
    assert "| yes | r8 +0.210 ± 0.006 better |" in md
    assert "- sst2 shock unified_v1c (exploratory): drop -0.090; smaller than lora_r8 by more than t·SE (every fixed rank)." in md
    # a fixed rank that recovers by itself takes the credit away from the controller
    runs += [_fake_run("sst2", "lora_r4", "shock", s, 0, shock=(0.8, 0.5, 0.8 + 0.01 * s)) for s in range(3)]
    md = "\n".join(rep.render_claims(runs))
    assert "| r4 +0.000 ± 0.000 equal; r8 +0.200 ± 0.001 better | no |" in md
    assert "not better than lora_r4. Reproduced: **yes**" in md  # reversible, but fixed r4 is too
    assert "smaller than lora_r4, lora_r8 by more than t·SE (every fixed rank)." in md
    # CoLA's shock cells were run after the drop hypothesis was written down: there it is a test
    runs += [_fake_run("cola", m, "shock", s, 0, shock=(0.3, 0.3 - d - 0.01 * s - JIT[s] * (m != "lora_r8"), 0.3))
             for s in range(3) for m, d in (("lora_r8", 0.2), ("unified_v3", 0.05), ("unified_v1", 0.05))]
    md = "\n".join(rep.render_claims(runs))
    assert "- cola shock unified_v3 (test): drop -0.060; smaller than lora_r8 by more than t·SE (every fixed rank)." in md
    # the hypothesis names v3: another method's drop on the same task, run later, is not the test
    assert "- cola shock unified_v1 (exploratory): drop -0.060" in md
    # a cell that had learned nothing before the shock (CoLA at MCC 0) cannot reproduce or refute the cycle
    runs += [_fake_run("cola", m, "shockrand", s, 0, shock=(0.001 * s - 0.001, 0.0, 0.0), mirror=0.1,
                       snaps=("saved", "restored"))
             for s in range(3) for m in ("lora_r8", "unified_v3")]
    md = "\n".join(rep.render_claims(runs))
    assert "**cola shockrand unified_v3**" in md and "Reproduced: **untestable**. Untestable, because before the shock" in md
    assert "- cola shockrand unified_v3 (test): drop +0.000" in md and "Uninformative, because before the shock" in md
    # ... and the claim table marks that row's Δ columns, not the rows where the task was learned
    row = next(line for line in md.splitlines() if line.startswith("| cola shockrand | unified_v3 |"))
    assert row.count(" †") == 2 and row.endswith("equal † |")
    assert "† Uninformative row: before the shock this controller's dev metric was not above" in md
    assert not any("†" in line for line in md.splitlines() if line.startswith(("| sst2 shock", "| cola shock |")))
    assert "**cola shock unified_v3**" in md and "cola shock unified_v3**: in MIRROR during the window in 0/3" in md


def test_noise_rows_are_uninformative_where_clean_r8_learned_nothing_at_that_budget():
    rep = load_benchmark("quality/report.py")
    cells = [("mrpc", "lora_r8", "clean", 0.812), ("mrpc", "lora_r8", "noise40", 0.81),
             ("mrpc", "unified_v1", "noise40", 0.82), ("cola", "lora_r8", "clean", 0.30),
             ("cola", "lora_r8", "noise40", 0.10), ("cola", "unified_v1", "noise40", 0.12)]
    runs = [_fake_run(t, m, c, s, v + 0.002 * (s - 1) + JIT[s] * (m != "lora_r8")) for s in range(3)
            for t, m, c, v in cells]
    for r in runs:
        r["majority_baseline"] = {"f1": 0.812, "accuracy": 0.684} if r["task"] == "mrpc" else {"mcc": 0.0}
    md = "\n".join(rep.render_claims(runs))
    # MRPC: r8 sits at the majority class's F1 even on clean labels, so the noisy row is marked and the claim untestable
    mrpc = next(line for line in md.splitlines() if line.startswith("| mrpc | noise40 | unified_v1 |"))
    assert mrpc.count(" ‡") == 1 and "better ‡ | – | –" in mrpc  # no adalora cell: nothing to mark there
    assert "reproduced: **untestable at this budget**: lora_r8 does not learn MRPC even on clean labels" in md
    assert "‡ Uninformative row: on clean labels, at the same budget, lora_r8 is not above the majority" in md
    # CoLA: learned clean (MCC 0.30 > 0), so its noisy row is a real test and carries no mark
    cola = next(line for line in md.splitlines() if line.startswith("| cola | noise40 | unified_v1 |"))
    assert "‡" not in cola
    for r in runs:  # once the clean r8 learns MRPC, a +1 point gap is a plain "no"
        if r["task"] == "mrpc" and r["condition"] == "clean":
            r["metrics"]["f1"] += 0.05
    md = "\n".join(rep.render_claims(runs))
    assert "Claim (+31 points) reproduced: **no**." in md and "‡" not in md


def test_claim_one_read_against_r16_credits_the_controller_only_where_r8_falls_short():
    rep = load_benchmark("quality/report.py")
    runs = []
    for s in range(3):
        e = 0.01 * (s - 1)
        j, k = (0.01, -0.01, 0.0)[s], (0.005, -0.005, 0.0)[s]  # the methods' own seed noise on MRPC (pairs differ)
        runs += [_fake_run("mrpc", "lora_r8", "clean", s, 0.85 + e), _fake_run("mrpc", "lora_r16", "clean", s, 0.86 + e + k),
                 _fake_run("mrpc", "unified_v1", "clean", s, 0.855 + e + j, 7.7),
                 _fake_run("cola", "lora_r8", "clean", s, 0.10 + e),
                 _fake_run("cola", "lora_r16", "clean", s, 0.20 + e + JIT[(s + 2) % 3]),
                 _fake_run("cola", "unified_v1", "clean", s, 0.20 + e + JIT[s], 8.0)]
    md = "\n".join(rep.render_claims(runs))
    assert "| mrpc | unified_v1 | +0.005 ± 0.006 (f1) | equal (|Δ| ≤ t·SE) | -0.005 ± 0.003 | equal | 7.70 | +4% / +52% |" in md
    assert "| cola | unified_v1 | +0.100 ± 0.001 (mcc) | better | +0.000 ± 0.002 | equal | 8.00 | +0% / +50% |" in md
    assert ("Read against lora_r16: equal or better on 2/2 tasks with r16 measured (cola, mrpc); rank reduction vs "
            "r16 +50% to +52%. Fixed lora_r8 is worse than r16 on cola, where the controller is not.") in md
    # every clean cell against every fixed rank, the fixed ranks among themselves included
    assert "| cola | lora_r8 | mcc | r16 -0.100 ± 0.001 worse |" in md
    assert "| cola | unified_v1 | mcc | r8 +0.100 ± 0.001 better; r16 +0.000 ± 0.002 equal |" in md
    cola = [r for r in runs if r["task"] == "cola"]  # r8 as good as r16 everywhere: the saving is rank 8's
    for r in cola:
        if r["method"] == "lora_r8":
            r["metrics"]["mcc"] += 0.1
    md = "\n".join(rep.render_claims(runs))
    assert "every one of them: that saving is rank 8's, not the controller's." in md
    md = "\n".join(rep.render_claims([r for r in runs if r["method"] != "lora_r16"]))
    assert "| – | – |" in md and "Read against lora_r16" not in md  # no r16 cell: no reading against it


def test_random_label_shock_is_recorded_and_kept_apart_from_a_flip_shock(quality_out, tiny_model_dir):
    out = quality_out / "random_shock"
    args = ["--quick", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods", "lora_r8", "--conditions",
            "shock", "--seeds", "0", "--threads", "1", "--out", str(out)]
    assert load_benchmark("quality/run.py").main(args + ["--shock-kind", "random"]) == 0
    res = json.loads((out / "runs" / "mrpc__lora_r8__shock__s0.json").read_text())
    assert res["shock"]["kind"] == "random" and res["config"]["shock_kind"] == "random"
    with pytest.raises(SystemExit, match="different budget"):  # a flip shock must not land in the same cell
        load_benchmark("quality/run.py").main(args)


def test_shockrand_condition_is_its_own_cell_beside_the_flip_shock(quality_out, tiny_model_dir):
    out = quality_out / "shockrand"
    args = ["--quick", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods", "lora_r8", "--seeds", "0",
            "--threads", "1", "--out", str(out)]
    assert load_benchmark("quality/run.py").main(args + ["--conditions", "shock,shockrand"]) == 0
    flip = json.loads((out / "runs" / "mrpc__lora_r8__shock__s0.json").read_text())
    rand = json.loads((out / "runs" / "mrpc__lora_r8__shockrand__s0.json").read_text())
    assert flip["shock"]["kind"] == "flip" and rand["shock"]["kind"] == "random"
    assert flip["shock"]["window"] == rand["shock"]["window"]
    rep = load_benchmark("quality/report.py")
    assert rep.main(["--runs", str(out / "runs"), "--out", str(out)]) == 0
    md = (out / "quality.md").read_text()
    assert "Shock (`shock`): train labels flipped" in md
    assert "Shock (`shockrand`): train labels replaced by uniformly random labels" in md
    assert (out / "quality_plots" / "mrpc_shockrand.png").stat().st_size > 0


def test_contention_flag_discounts_the_benchmarks_own_threads():
    import _common

    assert not _common.load_record([1.9, 2.0], own_threads=2)["under_contention"]  # its own 2 threads on 2 cores
    assert _common.load_record([1.9, 2.7], own_threads=2)["under_contention"]  # something else ran too
    assert _common.load_record([1.6], own_threads=1)["under_contention"]


def test_quality_shards_split_the_grid_between_parallel_workers(tiny_model_dir, tmp_path):
    run = load_benchmark("quality/run.py")
    base = ["--quick", "--steps", "2", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods",
            "lora_r4,lora_r8", "--conditions", "clean", "--seeds", "0,1", "--threads", "1", "--out", str(tmp_path)]
    got = []
    for shard in ("0/2", "1/2"):
        before = {p.name for p in (tmp_path / "runs").glob("*.json")} if (tmp_path / "runs").exists() else set()
        assert run.main(base + ["--shard", shard]) == 0
        got.append({p.name for p in (tmp_path / "runs").glob("*.json")} - before)
    assert len(got[0]) == len(got[1]) == 2 and not got[0] & got[1]
    assert got[0] | got[1] == {f"mrpc__{m}__clean__s{s}.json" for m in ("lora_r4", "lora_r8") for s in (0, 1)}
    res = json.loads((tmp_path / "runs" / "mrpc__lora_r8__clean__s1.json").read_text())
    assert res["config"]["device"] == "cpu"
    with pytest.raises(SystemExit):
        run.main(base + ["--shard", "2/2"])


def test_quality_claims_let_parallel_workers_take_each_job_once(tiny_model_dir, tmp_path, capsys):
    run = load_benchmark("quality/run.py")
    base = ["--quick", "--steps", "2", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods",
            "lora_r4,lora_r8", "--conditions", "clean", "--seeds", "0", "--threads", "1", "--out", str(tmp_path)]
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "mrpc__lora_r4__clean__s0.claim").touch()  # another worker holds this job
    assert run.main(base + ["--claim", str(claims)]) == 0
    assert {p.name for p in (tmp_path / "runs").glob("*.json")} == {"mrpc__lora_r8__clean__s0.json"}
    assert "skip mrpc__lora_r4__clean__s0 (claimed by another worker)" in capsys.readouterr().out
    assert (claims / "mrpc__lora_r8__clean__s0.claim").exists()
    assert run.main(base + ["--claim", str(tmp_path / "claims2")]) == 0  # a new sitting: r8 is done, r4 runs
    assert "skip mrpc__lora_r8__clean__s0 (done)" in capsys.readouterr().out
    assert (tmp_path / "runs" / "mrpc__lora_r4__clean__s0.json").exists()


def test_gpu_sitting_grid_workers_share_the_grid_without_running_a_job_twice(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import tarfile

    q, out, logs = tmp_path / "q", tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, MODEL=str(tiny_model_dir), QOUT=str(q), RESULTS=str(tmp_path / "res"), OUT=str(out),
               LOGS=str(logs), GRID_DEVICE="cpu", WORKERS="3", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sitting.sh"
    r = subprocess.run(["bash", str(script), "grid", "mrpc", "clean", "mrpc=1e-3", "lora_r4,lora_r8", "--quick",
                        "--steps", "2", "--seeds", "0,1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = {f"mrpc__{m}__clean__s{s}" for m in ("lora_r4", "lora_r8") for s in (0, 1)}
    assert {p.stem for p in (q / "runs").glob("*.json")} == want
    written = [line.split(":")[0] for f in logs.glob("grid_*.log") for line in f.read_text().splitlines()
               if "wall=" in line]
    assert sorted(written) == sorted(want)  # 3 workers, 4 jobs, each run exactly once
    (tgz,) = out.glob("results_grid_*.tgz")
    with tarfile.open(tgz) as t:
        assert sum(n.endswith(".json") and "/runs/" in n for n in t.getnames()) == 4


def test_gpu_sitting_check_phase_runs_end_to_end_as_a_cpu_dry_run(tmp_path):
    """The check phase has no GPU to run on here, so its plumbing runs as a quick CPU dry run: every step's flags
    parse, every benchmark writes its JSON in the dtype asked for, and the tarball is packed. A typo in the script
    would otherwise surface only on a lent GPU, at the cost of its few minutes."""
    import json
    import os
    import subprocess

    res, out = tmp_path / "res", tmp_path / "out"
    env = dict(os.environ, CHECK_DEVICE="cpu", CHECK_QUICK="1", SKIP_TESTS="1", DTYPES="bfloat16", RESULTS=str(res),
               OUT=str(out), LOGS=str(tmp_path / "logs"), QOUT=str(tmp_path / "q"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sitting.sh"
    r = subprocess.run(["bash", str(script), "check"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    # one interpreter prints the versions and decides the C++ arm
    import importlib.metadata

    import torch

    assert f"torch {torch.__version__} cuda {torch.version.cuda} transformers " in r.stderr, r.stderr[-3000:]
    assert f"layer kernel='cpp' arm: {'--with-cpp' if can_build_cpp() else 'left out'}" in r.stdout, r.stdout[-3000:]
    names = ("perf_layer", "perf_controller_overhead", "perf_mirror_cost", "perf_layer_variants")
    for name in names:
        payload = json.loads((res / f"{name}_quick.json").read_text())
        assert payload["device"] == "cpu" and payload["dtype"] == "bfloat16", name
        assert "--device cpu --dtype bfloat16" in payload["command"] and "--quick" in payload["command"], name
        assert payload["env"]["peft"] == importlib.metadata.version("peft"), name  # recorded, imported or not
    assert (out / "results_check.tgz").is_file()


@pytest.mark.slow
def test_the_cuda_tests_pass_as_a_cpu_dry_run():
    """tests/test_cuda.py is the first thing a GPU sitting runs, and sittings are rare: run its dry run here (every
    test with the CPU as its device: gloo for nccl, CPU autocast, bitsandbytes' CPU backend), so a test the library
    has moved away from fails in CI and not on a lent GPU, at the cost of its few minutes."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, UNIFIED_LORA_TEST_DEVICE="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        str(root / "tests" / "test_cuda.py")], env=env, cwd=root, capture_output=True, text=True,
                       timeout=900)
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= 50, tail  # the file ran, not just its skips


def test_gpu_results_are_published_apart_from_the_cpu_page(tmp_path):
    from _common import publish

    def render(p):
        return f"## fake section on {p['device']}"

    publish("perf_thing", {"command": "python x.py", "device": "cpu"}, render, results_dir=tmp_path)
    publish("perf_thing", {"command": "python x.py --device cuda", "device": "cuda:0", "dtype": "bfloat16"}, render,
            results_dir=tmp_path)
    assert (tmp_path / "perf_thing.json").exists() and (tmp_path / "perf_thing_cuda_bfloat16.json").exists()
    cpu_md, gpu_md = (tmp_path / "perf.md").read_text(), (tmp_path / "perf_gpu.md").read_text()
    assert "on cpu" in cpu_md and "cuda" not in cpu_md
    assert gpu_md.startswith("# Performance benchmarks (GPU)") and "on cuda:0" in gpu_md


@pytest.mark.slow
@pytest.mark.skipif(not can_build_cpp(), reason="--with-cpp builds csrc/mirror_fused.cpp: needs g++ and ninja")
def test_mirror_fused_cpp_kernels_compute_the_library_drift_and_copy(tmp_path):
    import torch

    mc = load_benchmark("perf/mirror_cost.py")
    k = mc.fused_kernels()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # under one vector width, odd, and over one 64 Ki-element chunk
        w = [torch.randn(n, generator=g).to(dtype) for n in (1, 17, 300, 70_001)]
        s = [x + 0.1 * torch.randn(x.shape, generator=g).to(dtype) for x in w]
        want = torch.stack([torch.stack([(a.double() - b.double()).square().sum(), b.double().square().sum()])
                            for a, b in zip(w, s)]).T
        torch.testing.assert_close(k.drift_sq(w, s), want, rtol=1e-5, atol=0)
        out = [torch.empty_like(x) for x in w]
        k.copy_all(out, w)
        assert all(torch.equal(a, b) for a, b in zip(out, w))
    with pytest.raises(RuntimeError, match="2 tensors against 1"):
        k.drift_sq(w[:2], s[:1])
    with pytest.raises(RuntimeError, match="not contiguous"):
        k.copy_all([torch.empty(4, 4)], [torch.randn(4, 4).t()])
    # the benchmark checks both kernels over the library's snapshot pool, then times the library's
    # kernel="fused" cycle as its own arm beside the eager one, and the raw fused cycle in the profile
    payload = mc.main(["--quick", "--with-cpp", "--results-dir", str(tmp_path)])
    case = payload["cases"][0]
    assert mc.CPP_CYCLE in case["primitive_multiples"] and payload["kernels"] == ["eager", "eager_unpacked", "fused"]
    for arm in (case["fused"], case["unpacked"], case):
        assert arm["ratio"]["median"] > 0 and set(arm["phase_multiples"]) == {"save", "drift", "restore"}
    md = (tmp_path / "perf.md").read_text()
    assert "`--with-cpp`" in md and "| tiny | fused |" in md and "| tiny | eager, packed (default) |" in md
    assert "| tiny | eager, pack=False |" in md and mc.PACKED_DRIFT in md


@pytest.mark.skipif(not can_build_cpp(), reason="--with-cpp builds csrc/nested_path.cpp: needs g++ and ninja")
def test_layer_with_cpp_times_the_cpp_kernel_as_a_third_arm_and_the_variants_include_it(tmp_path,
                                                                                         layer_variants_quick):
    payload = load_benchmark("perf/layer.py").main(["--quick", "--with-cpp", "--results-dir", str(tmp_path)])
    assert [c["rank"] for c in payload["cases"]] == [4, 8, 16]
    for c in payload["cases"]:  # checked equal to the default layer before timing; saves what PEFT saves
        assert c["cpp"]["ratio"]["median"] > 0 and c["cpp"]["ratio"]["n"] == 3
        assert c["cpp"]["memory"]["activation_bytes"] == c["memory"]["peft"]["activation_bytes"]
    md = (tmp_path / "perf.md").read_text()
    assert "`--with-cpp`" in md and 'kernel="cpp" ratio' in md
    variants, variants_dir = layer_variants_quick  # (the variants build the cpp kernel themselves when they can)
    assert all(list(c["variants"]) == ["function", "cpp", "cat", "perblock"] for c in variants["cases"])
    md = (variants_dir / "perf.md").read_text()
    assert 'cpp (library, kernel="cpp")' in md and "| = Python floor | + arithmetic |" in md
    for c in variants["cases"]:  # the diagnostic arms ran, interleaved with the variants, every repeat
        d = c["diagnostics"]
        assert all(d[k]["n"] == 3 for k in ("python_floor_us", "default_arithmetic_us", "default_gap_us",
                                            "peft_branch_us", "default_branch_us", "cpp_branch_us"))
        assert d["base_s"]["median"] > 0


def test_mirror_cost_renders_every_committed_json_old_and_new():
    # the stop-8 GPU JSON predates the profile's gather primitive and the pack=False arm; it must still render
    mc = load_benchmark("perf/mirror_cost.py")
    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").rglob("*mirror_cost*.json"))
    assert any("cuda" in f.name for f in files) and len(files) >= 3
    for f in files:
        p = json.loads(f.read_text())
        md = mc.render(p)
        assert ("eager, packed (default)" in md) is all("unpacked" in c for c in p["cases"]), f


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("script", ["perf/layer.py", "perf/mirror_cost.py", "perf/controller_overhead.py"])
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(script, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        load_benchmark(script).main(["--quick", "--device", "cuda", "--results-dir", str(tmp_path)])


def test_gpu_carry_ships_a_half_precision_minilm_that_loads_as_the_same_model(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from unified_lora.data import default_model_path
    from unified_lora.data.loaders import PACKAGE_GLUE_DIR

    carry = load_benchmark("gpu_carry.py")
    res = carry.build(tmp_path / "carry", default_model_path(), PACKAGE_GLUE_DIR, tasks=("MRPC",))
    assert 0 < res["max_rel_rounding"] < 2.0 ** -10 and res["bytes"] < carry.LIMIT
    assert (tmp_path / "carry" / "glue" / "MRPC" / "dev.tsv").is_file()
    half_dir = tmp_path / "carry" / "minilm16"
    tok = AutoTokenizer.from_pretrained(half_dir)
    batch = tok(["The controller snapshots the adapter.", "Labels were flipped."], padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    got = AutoModel.from_pretrained(half_dir, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in got.parameters())
    with torch.no_grad():
        a, b = ref(**batch).last_hidden_state, got(**batch).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() > 0.9999
    assert not torch.equal(a, b)  # it really is the rounded copy


def test_unified_method_names_carry_policy_and_min_dwell(tiny_model_dir, tmp_path):
    run = load_benchmark("quality/run.py")
    assert run.parse_unified("unified_v3") == ("v3", "drift", 0, "alpha_over_r")
    assert run.parse_unified("unified_v3_lossworse_d10") == ("v3", "loss_worse", 10, "alpha_over_r")
    assert run.parse_unified("unified_v1c_d4") == ("v1c", "drift", 4, "alpha_over_r")
    assert run.parse_unified("unified_v1_fs") == ("v1", "drift", 0, "alpha_over_max_rank")
    assert run.parse_unified("unified_v3_never_d10_fs") == ("v3", "never", 10, "alpha_over_max_rank")
    for bad in ("unified_v2", "unified_v3_d", "unified_v3_d10_never", "unified_v3_sometimes", "unified_v1_fs_d10",
                "unified_v1_d4_d8", "unified_v1_fs_fs"):
        with pytest.raises(ValueError):
            run.parse_unified(bad)
    with pytest.raises(SystemExit):
        run.main(["--quick", "--model", str(tiny_model_dir), "--methods", "unified_v3_dx", "--out", str(tmp_path)])
    assert run.main(["--quick", "--model", str(tiny_model_dir), "--tasks", "mrpc", "--methods", "unified_v3_d3_fs",
                     "--conditions", "clean", "--seeds", "0", "--threads", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "runs" / "mrpc__unified_v3_d3_fs__clean__s0.json").read_text())
    assert res["info"]["min_dwell"] == 3 and res["info"]["mirror_policy"] == "drift"
    # one scale at every rank, and it is lora_r8's alpha / 8 (--lora-alpha defaults to 16)
    assert res["info"]["scaling"] == "alpha_over_max_rank"
    assert res["info"]["scale_by_rank"] == {"4": 2.0, "8": 2.0, "16": 2.0}


def test_lr_probe_marks_the_best_lr_and_no_lr_when_every_lr_ties(tmp_path):
    rep = load_benchmark("quality/report.py")
    for task, values in (("sst2", {1e-3: 0.78, 3e-3: 0.82, 1e-2: 0.51}), ("cola", {1e-3: 0.0, 3e-3: 0.0})):
        for lr, v in values.items():
            pm = "mcc" if task == "cola" else "accuracy"
            d = tmp_path / f"lr{lr:g}" / "runs"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{task}.json").write_text(json.dumps(
                {"task": task, "primary_metric": pm, "metrics": {pm: v}, "config": {"lr": lr, "steps": 150}}))
    md = "\n".join(rep.render_probe(tmp_path))
    assert "| sst2 | 0.003 **(chosen)** | accuracy 0.8200 | 150 |" in md
    assert md.count("(chosen)") == 1  # CoLA ties at MCC 0: no LR is chosen
    assert "| cola | none chosen | every LR gives the same mcc: nothing learns at this budget | |" in md


def test_controller_variants_are_compared_with_lora_r8_and_their_default_variant():
    rep = load_benchmark("quality/report.py")
    runs = []
    for s in range(3):
        runs += [_fake_run("sst2", "lora_r8", "clean", s, 0.16 + 0.01 * s),
                 _fake_run("sst2", "unified_v3", "clean", s, 0.03 + 0.01 * s + JIT[s]),
                 _fake_run("sst2", "unified_v3_d10", "clean", s, 0.16 + 0.01 * s)]
    runs += [_fake_run("sst2", "unified_v3_never", "clean", s, 0.1) for s in range(2)]  # n=2: left out
    md = "\n".join(rep.render_variants(runs))
    assert "| sst2 | clean | unified_v3_d10 | 3 | 0.170 ± 0.010 (accuracy) | lora_r8 +0.000 ± 0.000 equal; " \
           "unified_v3 +0.130 ± 0.001 better |" in md  # paired: the same seed noise (JIT: not quite)
    assert "unified_v3_never" not in md and "| sst2 | clean | unified_v3 |" not in md


@pytest.mark.parametrize("name", ["forced", "natural", "natural_w0", "natural_none"])
def test_multitask_conflict_tables_are_those_of_their_committed_runs(tmp_path, name):
    """benchmarks/results/multitask_conflict_<name>.md is what `--render` writes from the committed JSON (every step of
    every run): no figure in the tables (README and BENCHMARKS.md quote them) was typed in or left from older runs."""
    import shutil

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    shutil.copy(results / f"multitask_conflict_{name}.json", tmp_path / "r.json")
    load_benchmark("multitask_conflict.py").main(["--render", str(tmp_path / "r")])
    assert (tmp_path / "r.md").read_text() == (results / f"multitask_conflict_{name}.md").read_text()


def test_multitask_quality_runs_resumes_and_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    """benchmarks/multitask_quality.py end to end on the tiny model (MRPC ships with the package): one JSON per
    (pair, method, seed) with each method's topology and the adapter parameters it trained, a second call skips
    what is done, and a call with another budget is refused in one line instead of being pooled with the old runs."""
    mq = load_benchmark("multitask_quality.py")
    out = tmp_path / "mq"
    args = ["--model", str(tiny_model_dir), "--task", "mrpc", "--pairs", "same", "flipped", "--seeds", "0",
            "--steps", "3", "--train-max", "64", "--dev-max", "16", "--max-length", "32", "--out", str(out)]
    assert mq.main(args) == 0
    runs = {(r["pair"], r["method"]): r for r in mq.read_runs(out)}
    assert set(runs) == {(p, m) for p in ("same", "flipped") for m in mq.METHODS}
    flipped = runs[("flipped", "shared")]
    assert flipped["tasks"] == ["mrpc_a", "mrpc_b_flipped"] and flipped["n"]["mrpc_b_flipped"]["flipped"]
    # the flipped task's dev set is the same rows with every label flipped, and the shared adapter predicts them alike
    assert flipped["metrics"]["mrpc_a"]["accuracy"] + flipped["metrics"]["mrpc_b_flipped"]["accuracy"] == 1.0
    assert runs[("same", "shared")]["mode_steps"] == [3, 0, 0] and runs[("same", "separate")]["mode_steps"] == [0, 3, 0]
    shared, separate = runs[("same", "shared")]["params_mean"], runs[("same", "separate")]["params_mean"]
    assert separate == 4 * shared  # two task adapters at rank 8 vs one at rank 4
    assert shared <= runs[("same", "unified")]["params_mean"] <= separate
    assert (tmp_path / "mq.md").read_text().count("| unified | 1 |") == 2
    # the variants: the plain cosine, and a warm-up of 20 (no transition in 3 steps) with a min dwell of 10
    ctl = {m: runs[("same", m)]["controller"] for m in ("unified", "unified_plain", "unified_warm")}
    assert [c["grad_noise"] for c in ctl.values()] == ["debias", "none", "debias"]
    assert (ctl["unified_warm"]["warmup_steps"], ctl["unified_warm"]["min_dwell"]) == (20, 10)
    assert runs[("same", "unified_warm")]["mode_steps"] == [3, 0, 0] and not runs[("same", "unified_warm")]["transitions"]
    capsys.readouterr()
    assert mq.main(args) == 0
    assert capsys.readouterr().out.count("(done)") == 2 * len(mq.METHODS)
    with pytest.raises(SystemExit, match=r"other settings \{'steps': \(3, 4\)\}"):
        mq.main([*args[:-1], str(out)] + ["--steps", "4"])


def test_multitask_quality_keeps_two_models_in_folders_of_one_name_apart(tiny_model_dir, tmp_path):
    """multitask_quality.py recorded its model by its folder's name alone: another model in a folder of that name
    ("model", "checkpoint-500") resumed the grid of the first, and its runs combined with them. Each run records its
    model files' fingerprint (quality/run.py's, now in _common.py) and both are refused; a run written before the
    fingerprint was recorded is compared by name, as it was."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    mq = load_benchmark("multitask_quality.py")
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    torch.manual_seed(1)  # the same shapes and tokenizer, other weights
    BertForSequenceClassification(BertConfig.from_pretrained(b)).save_pretrained(b)

    def args(model, out, seed):
        return ["--model", str(model), "--task", "mrpc", "--pairs", "same", "--methods", "shared", "--seeds", str(seed),
                "--steps", "2", "--train-max", "32", "--dev-max", "8", "--max-length", "16", "--out", str(out)]

    assert mq.main(args(a, tmp_path / "ra", 0)) == 0
    with pytest.raises(SystemExit, match=r"other settings \{'model_fingerprint': \('\w+', '\w+'\)\}") as refused:
        mq.main(args(b, tmp_path / "ra", 1))
    (run_a,) = mq.read_runs(tmp_path / "ra")
    fa, fb = (mq.model_fingerprint(str(m)) for m in (a, b))
    assert run_a["settings"]["model"] == "model" and run_a["settings"]["model_fingerprint"] == fa != fb
    assert f"{{'model_fingerprint': ('{fa}', '{fb}')}}" in str(refused.value)
    assert mq.main(args(b, tmp_path / "rb", 1)) == 0
    with pytest.raises(SystemExit, match=rf"rb: its runs have other settings than .*ra's \(\{{'model_fingerprint': "
                                         rf"\('{fa}', '{fb}'\)\}}: theirs, these\); they do not combine"):
        mq.combined_runs([tmp_path / "ra", tmp_path / "rb"])
    # a run written before the fingerprint was recorded: resumed and combined by the folder's name, as it was
    (old,) = (tmp_path / "ra").glob("*.json")
    res = json.loads(old.read_text())
    del res["settings"]["model_fingerprint"]
    old.write_text(json.dumps(res))
    assert [r["seed"] for r in mq.combined_runs([tmp_path / "ra", tmp_path / "rb"])] == [0, 1]
    assert mq.main(args(b, tmp_path / "ra", 1)) == 0
    assert sorted(r["seed"] for r in mq.read_runs(tmp_path / "ra")) == [0, 1]


@pytest.mark.parametrize("name", ["multitask_quality", "multitask_quality_seeds34"])
def test_multitask_quality_table_is_that_of_its_committed_runs(name, tmp_path):
    """benchmarks/results/NAME.md is what `--render` writes from the committed run JSONs: no figure in it (README and
    BENCHMARKS.md quote it) was typed in or left from older runs (seeds34: the held-out seeds 3 and 4)."""
    import shutil

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    shutil.copytree(results / name, tmp_path / "r")
    load_benchmark("multitask_quality.py").main(["--render", str(tmp_path / "r")])
    assert (tmp_path / "r.md").read_text() == (results / f"{name}.md").read_text()


def test_multitask_quality_five_seed_table_is_that_of_both_folders(tmp_path):
    """benchmarks/results/multitask_quality_5seeds.md (the 5-seed figures README and BENCHMARKS.md quote) is what
    `--render A B --render-to F` writes from the two committed folders; a folder twice is refused (a run in both)."""
    mq = load_benchmark("multitask_quality.py")
    root = Path(__file__).resolve().parents[1]
    names = ["benchmarks/results/multitask_quality", "benchmarks/results/multitask_quality_seeds34"]
    to = "benchmarks/results/multitask_quality_5seeds.md"
    text = mq.report(mq.combined_runs([root / n for n in names]), names, to)  # (the header names them as given)
    assert text == (root / to).read_text()
    with pytest.raises(SystemExit, match="is also in"):
        mq.combined_runs([root / names[0]] * 2)


@pytest.mark.parametrize("page, extra", [("", []), ("quality_mrpc3ep", ["--probe", "none"]),
                                         ("quality_earlier", ["--probe", "none"]), ("quality_gpu", ["--probe", "none"])])
def test_quality_pages_are_those_of_their_committed_runs(page, extra, tmp_path):
    """benchmarks/results/[PAGE/]quality.md is what `report.py` writes from the committed run JSONs, with the arguments
    BENCHMARKS.md's Re-running block gives it (the GPU page's --note from its note.txt), and it draws the committed
    plots (by name): no figure in the pages README and BENCHMARKS.md quote was typed in or left from older runs."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = results / (page or "quality") / "runs"
    if page == "quality_gpu":
        extra = [*extra, "--note", (results / page / "note.txt").read_text().rstrip("\n")]
    assert load_benchmark("quality/report.py").main(["--runs", str(runs), "--out", str(tmp_path), *extra]) == 0
    assert (tmp_path / "quality.md").read_text() == (results / page / "quality.md").read_text()
    assert sorted(p.name for p in (tmp_path / "quality_plots").iterdir()) == \
        sorted(p.name for p in (results / page / "quality_plots").iterdir())


def test_the_claim_tables_quote_the_committed_quality_pages():
    """Every mean ± std and Δ ± SE (three decimals) in BENCHMARKS.md's table of the source documents' claims and in
    README's is printed in a committed quality page. Both tables kept 2-Welch-SE figures after `report.py` moved to
    the paired t (stop 38): SST-2 at 3 epochs, 20 % noise, read "better than AdaLoRA (+0.045 ± 0.013)", where
    quality_gpu/quality.md prints +0.045 ± 0.016, equal."""
    root = Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results"
    pages = "".join((results / p / "quality.md").read_text() for p in ("", "quality_mrpc3ep", "quality_gpu"))
    benchmarks = (root / "BENCHMARKS.md").read_text().split("### The source documents' claims", 1)[1].split("\n### ")[0]
    readme = (root / "README.md").read_text().split("| claim (source) | status here |", 1)[1].split("\n\n", 1)[0]
    for name, table in (("BENCHMARKS.md", benchmarks), ("README.md", readme)):
        figures = re.findall(r"[-+]?\d\.\d{3} ± \d\.\d{3}", table.replace("−", "-"))
        assert len(figures) > 30, name
        missing = [f for f in figures if f not in pages and f.lstrip("+") not in pages]
        assert not missing, f"{name}: {missing} are in no committed quality page"
