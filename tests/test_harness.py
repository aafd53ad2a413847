"""The benchmark harness's bookkeeping: which finished runs a resumed grid may skip or pool, and which model and
tokenizer a benchmark runs. Real runs (--quick, a tiny saved BERT); the training itself is what the smoke tests
cover."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import REPO, load_benchmark



def _grid(model, out, *extra):
    return ["--quick", "--threads", "1", "--model", str(model), "--tasks", "mrpc", "--seeds", "0", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """Finished runs (lora_r8 and adalora, clean, seed 0) at run.py's defaults; each test copies what it needs."""
    out = tmp_path_factory.mktemp("finished")
    assert load_benchmark("quality/run.py").main(_grid(tiny_model_dir, out, "--methods", "lora_r8,adalora",
                                              "--conditions", "clean")) == 0
    return out / "runs"


def _out_with(tmp_path, finished, *names):
    (tmp_path / "runs").mkdir(parents=True)
    for n in names:
        shutil.copy(finished / n, tmp_path / "runs" / n)
    return tmp_path


R8 = "mrpc__lora_r8__clean__s0.json"


def test_a_shock_setting_does_not_refuse_a_finished_clean_run(finished, tiny_model_dir, tmp_path, capsys):
    # BENCHMARKS.md's shock commands pass --shock-len 0.1; a clean run, which has no shock window, must not be
    # refused for having recorded the default 0.2 (the whole command used to stop there)
    out = _out_with(tmp_path, finished, R8)
    assert load_benchmark("quality/run.py").main(_grid(tiny_model_dir, out, "--methods", "lora_r8", "--conditions", "clean",
                                              "--shock-len", "0.1")) == 0
    assert "skip mrpc__lora_r8__clean__s0 (done)" in capsys.readouterr().out


def test_a_finished_run_of_another_model_is_refused_not_skipped(finished, tiny_model_dir, tmp_path):
    other = tmp_path / "another_bert"
    shutil.copytree(tiny_model_dir, other)
    out = _out_with(tmp_path / "o", finished, R8)
    with pytest.raises(SystemExit, match=r"different budget \{'model': \('tiny_bert', 'another_bert'\)\}"):
        load_benchmark("quality/run.py").main(_grid(other, out, "--methods", "lora_r8", "--conditions", "clean"))


def test_a_new_seed_at_another_lr_is_refused_unless_the_whole_cell_is_rerun(finished, tiny_model_dir, tmp_path):
    out = _out_with(tmp_path, finished, R8)
    run = load_benchmark("quality/run.py")
    # seed 1 at another LR would sit in seed 0's cell: a mean ± std over two LRs
    with pytest.raises(SystemExit, match=r"mrpc__lora_r8__clean__s0.json exists with a different budget \{'lr'"):
        run.main(_grid(tiny_model_dir, out, "--methods", "lora_r8", "--conditions", "clean", "--seeds", "1",
                       "--lr", "0.01"))
    assert not (out / "runs" / "mrpc__lora_r8__clean__s1.json").exists()
    # --force over every seed of the cell replaces the old budget: nothing is left to mix with
    assert run.main(_grid(tiny_model_dir, out, "--methods", "lora_r8", "--conditions", "clean", "--seeds", "0,1",
                          "--lr", "0.01", "--force")) == 0
    lrs = {json.loads(p.read_text())["config"]["lr"] for p in (out / "runs").glob("*.json")}
    assert lrs == {0.01}


def test_the_adalora_regulariser_is_part_of_adalora_runs_budget_only(finished, tiny_model_dir, tmp_path):
    out = _out_with(tmp_path, finished, R8, "mrpc__adalora__clean__s0.json")
    run = load_benchmark("quality/run.py")
    with pytest.raises(SystemExit, match=r"\{'adalora_orth_reg': \(0.5, 0.1\)\}"):
        run.main(_grid(tiny_model_dir, out, "--methods", "adalora", "--conditions", "clean",
                       "--adalora-orth-reg", "0.1"))
    assert run.main(_grid(tiny_model_dir, out, "--methods", "lora_r8", "--conditions", "clean",
                          "--adalora-orth-reg", "0.1")) == 0  # LoRA does not read it


def test_an_empty_run_json_is_a_one_line_error_naming_it(finished, tiny_model_dir, tmp_path):
    out = _out_with(tmp_path, finished)
    (out / "runs" / R8).write_text("")  # e.g. a copy cut short
    with pytest.raises(SystemExit, match=r"mrpc__lora_r8__clean__s0.json: not a readable run JSON"):
        load_benchmark("quality/run.py").main(_grid(tiny_model_dir, out, "--methods", "lora_r8", "--conditions", "clean"))


def test_report_keeps_runs_of_two_lrs_apart_and_gives_no_verdict_across_budgets(finished, tiny_model_dir, tmp_path,
                                                                                capsys):
    # run.py checks a cell's seeds, not a task's methods: lora_r4 at another LR beside lora_r8
    other = tmp_path / "other"
    assert load_benchmark("quality/run.py").main(_grid(tiny_model_dir, other, "--methods", "lora_r4", "--conditions", "clean",
                                              "--lr", "0.01")) == 0
    out = _out_with(tmp_path / "task", finished, R8)
    shutil.copy(other / "runs" / "mrpc__lora_r4__clean__s0.json", out / "runs")
    rep = load_benchmark("quality/report.py")
    assert rep.main(["--runs", str(out / "runs"), "--out", str(out), "--probe", "none"]) == 0
    md = (out / "quality.md").read_text()
    assert "| clean | lora_r4 (lr 0.01) | 1 |" in md and "| clean | lora_r8 (lr 0.001) | 1 |" in md
    assert "AdamW lr 0.001 / 0.01 (by row)" in md
    runs = rep.load_runs(out / "runs")
    r4, r8 = [r for r in runs if r["method"] == "lora_r4"], [r for r in runs if r["method"] == "lora_r8"]
    assert rep._delta(r4 * 2, r8 * 2, lambda r: r["metrics"]["f1"])[2] == "budgets differ: no verdict"
    assert rep._delta(r8 * 2, r8 * 2, lambda r: r["metrics"]["f1"])[2].startswith("equal")
    # two sittings' runs in one folder (or runs of the code before the check): one cell, seeds at two LRs. The
    # claims pool a cell's seeds, so the page is an error naming the cell, not a mean over both
    assert load_benchmark("quality/run.py").main(_grid(tiny_model_dir, other, "--methods", "lora_r8", "--conditions", "clean",
                                              "--lr", "0.01", "--seeds", "1")) == 0
    shutil.copy(other / "runs" / "mrpc__lora_r8__clean__s1.json", out / "runs")
    assert rep.main(["--runs", str(out / "runs"), "--out", str(tmp_path / "page"), "--probe", "none"]) == 2
    assert "mrpc clean lora_r8: seeds 0 and 1 ran with different budgets {'lr': (0.001, 0.01)}" in capsys.readouterr().err


def test_e2e_tokenizes_with_the_models_own_tokenizer(tmp_path):
    """`--model PATH` runs that model on ids from its own vocabulary, not MiniLM's."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of", "to", "and", ".", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    d = tmp_path / "small_vocab_bert"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(d)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(d)
    e2e = load_benchmark("perf/e2e.py")
    model, opt, ctrl, loader = e2e.build_arm("peft_r8", str(d), 1, 32, 1)
    batch = next(e2e.batches(loader, 1))
    assert int(batch["input_ids"].max()) < len(vocab)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_multitask_benchmark_refuses_runs_of_other_settings_instead_of_skipping_them(tmp_path):
    shutil.copy(REPO / "benchmarks" / "results" / "multitask_shared_s0.json", tmp_path)  # 70 steps, sst2 + mrpc
    mt = load_benchmark("multitask_glue.py")
    with pytest.raises(SystemExit, match=r"multitask_shared_s0.json was run with other settings \{'steps': \(70, 3\)\}"):
        mt.main(["--results-dir", str(tmp_path), "--steps", "3", "--seeds", "0", "--arms", "shared"])
    with pytest.raises(SystemExit, match=r"\{'tasks': \(\['sst2', 'mrpc'\], \['sst2', 'rte'\]\)\}"):
        mt.main(["--results-dir", str(tmp_path), "--tasks", "sst2", "rte", "--seeds", "0", "--arms", "shared"])
    (tmp_path / "multitask_shared_s1.json").write_text("{")  # cut short
    with pytest.raises(SystemExit, match="multitask_shared_s1.json: not a readable run JSON"):
        mt.main(["--results-dir", str(tmp_path), "--report-only"])


def test_a_claim_left_by_a_killed_worker_is_taken_over(finished, tiny_model_dir, tmp_path, capsys):
    import os
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its id no longer runs anything (the worker was killed mid-run: no JSON, its claim left behind)
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "mrpc__lora_r8__clean__s0.claim").write_text(f"{dead.pid}\n")
    (claims / "mrpc__lora_r4__clean__s0.claim").write_text(f"{os.getpid()}\n")  # a live worker's: left alone
    run = load_benchmark("quality/run.py")
    assert run.main(_grid(tiny_model_dir, tmp_path, "--methods", "lora_r4,lora_r8", "--conditions", "clean",
                          "--claim", str(claims))) == 0
    assert {p.name for p in (tmp_path / "runs").glob("*.json")} == {R8}
    assert "skip mrpc__lora_r4__clean__s0 (claimed by another worker)" in capsys.readouterr().out
    assert (claims / "mrpc__lora_r8__clean__s0.claim").read_text().strip() != str(dead.pid)


def test_report_refuses_a_missing_probe_folder_and_none_leaves_the_section_out(finished, tmp_path, capsys):
    # a mistyped --probe used to drop the LR-probe section silently; 'none' is the explicit way to leave it out
    out = _out_with(tmp_path / "task", finished, R8)
    rep = load_benchmark("quality/report.py")
    assert rep.main(["--runs", str(out / "runs"), "--out", str(out), "--probe", str(tmp_path / "lrprobe")]) == 2
    assert "no LR-probe folder" in capsys.readouterr().err and not (out / "quality.md").exists()
    assert rep.main(["--runs", str(out / "runs"), "--out", str(out), "--probe", "none"]) == 0
    assert "Learning-rate probe" not in (out / "quality.md").read_text()


@pytest.mark.parametrize("start,length", [("0.9", "0.3"), ("0.5", "0"), ("-0.1", "0.2")])
def test_a_shock_window_outside_the_run_or_empty_is_refused_before_anything_runs(tiny_model_dir, tmp_path, capsys,
                                                                                 start, length):
    # a window ending past the last step used to train the whole run and then die on a KeyError (no "just after"
    # point in the curve); an empty window wrote a run whose report divided by its zero width
    with pytest.raises(SystemExit):
        load_benchmark("quality/run.py").main(_grid(tiny_model_dir, tmp_path, "--methods", "lora_r8,unified_v1",
                                                    "--conditions", "clean,shock", "--shock-start", start,
                                                    "--shock-len", length))
    err = capsys.readouterr().err
    assert f"--shock-start {float(start):g} --shock-len {float(length):g}" in err and "6-step run" in err
    assert not list((tmp_path / "runs").glob("*.json"))


def test_adalora_adapter_params_active_is_the_mean_over_the_run_like_its_mean_rank(finished):
    # the table's "adapter params active" is the mean over the run for LoRA and the controllers; AdaLoRA's used to
    # be the last step's count (rank 8 after pruning) beside a mean active rank of about 11
    res = json.loads((finished / "mrpc__adalora__clean__s0.json").read_text())
    n = res["n_adapted_layers"]
    unit = res["adapter_params_allocated"] / (12 * n)  # the tiny BERT's query and value have one shape
    assert res["mean_active_rank"] > res["final_mean_rank"]  # it pruned during the run, so the two counts differ
    assert abs(res["adapter_params_active"] - res["mean_active_rank"] * n * unit) <= 1
    assert res["adapter_params_final"] == sum(res["final_rank_per_layer"]) * unit


def test_report_counts_an_older_adalora_runs_params_over_the_run_not_at_its_last_step(finished):
    rep = load_benchmark("quality/report.py")
    res = json.loads((finished / "mrpc__adalora__clean__s0.json").read_text())
    old = dict(res, adapter_params_active=res["adapter_params_final"])  # what run.py recorded before
    del old["adapter_params_final"]
    mean = res["adapter_params_active"]
    assert abs(rep.active_params(old) - mean) <= 1 and rep.active_params(res) == mean
    row = next(line for line in rep.render([old], {}, rep.REPO).splitlines() if line.startswith("| clean | adalora"))
    assert f"| {round(rep.active_params(old)):,} ({res['adapter_params_allocated']:,}) |" in row
    assert f"({old['adapter_params_active']:,} params)" in row  # the last step's count, as a note
    old["final_rank_per_layer"] = [12] + old["final_rank_per_layer"][1:]  # layers of other shapes: not recoverable
    with pytest.raises(ValueError, match="cannot be recovered"):
        rep.active_params(old)


# ------------------------------------------------------------------ the test behind report.py's verdicts
def _cellruns(values, seeds=None, method="m"):
    """One cell's runs, as report.py reads them: seed s ran with value `values[i]`, same (empty) budget."""
    seeds = range(len(values)) if seeds is None else seeds
    return [{"task": "sst2", "method": method, "condition": "clean", "seed": s, "config": {},
             "primary_metric": "accuracy", "majority_baseline": {"accuracy": 0.5}, "metrics": {"accuracy": v}}
            for s, v in zip(seeds, values)]


def _acc(r):
    return r["metrics"]["accuracy"]


def test_the_t_quantile_matches_the_printed_table_without_scipy():
    rep = load_benchmark("quality/report.py")
    # two-sided 95 % points of Student's t (any printed table; the non-whole df from scipy.stats.t.ppf(0.975, df))
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423), (2.5, 3.5747),
                  (3.7, 2.8675)):
        assert rep._t_crit(df) == pytest.approx(t, abs=1e-4), df
    assert rep._t_p(1.3, 4) == pytest.approx(0.263452, abs=1e-6)
    assert rep._t_p(4.302653, 2) == pytest.approx(0.05, abs=1e-7)


def test_a_verdict_that_two_welch_ses_called_better_is_equal_by_the_paired_t_at_2_df():
    rep = load_benchmark("quality/report.py")
    # per-seed differences 2, 1, 3: Δ 2, SE = sd 1 / √3 = 0.577, t = 3.46 < t(0.975, 2) = 4.30. The old rule (Welch SE
    # √(1/3 + 1/3) = 0.816, Δ > 2 SE) printed "better" from three seeds
    d = rep._delta(_cellruns([3, 4, 5]), _cellruns([1, 3, 2]), _acc)
    assert (d[0], d.test, d.df) == (2, "paired", 2)
    assert d[1] == pytest.approx(1 / 3 ** 0.5)
    assert d[2].startswith("equal") and d.crit == pytest.approx(4.3027, abs=1e-4)
    assert d.p == pytest.approx(0.0742, abs=1e-4)


def test_pairing_by_seed_makes_a_consistent_small_difference_significant():
    rep = load_benchmark("quality/report.py")
    # seeds differ a lot from one another, the methods by 0.10, 0.10, 0.12 on every seed: paired SE 0.00667
    # (t = 16 at 2 df), where the unpaired SE (about 0.82) buries the difference
    d = rep._delta(_cellruns([1.10, 2.10, 3.12]), _cellruns([1.0, 2.0, 3.0]), _acc)
    assert d[0] == pytest.approx(0.32 / 3) and d[1] == pytest.approx(0.02 / 3) and d[2] == "better"
    assert rep._delta(_cellruns([1.0, 2.0, 3.0]), _cellruns([1.10, 2.10, 3.12]), _acc)[2] == "worse"


def test_differences_with_no_spread_get_no_verdict_not_an_infinite_t():
    """Per-seed differences all the same (0.1 on two seeds; up to float rounding: 0.9 − 0.8 and 0.8 − 0.7 differ in
    their last bits) have SE 0: t = Δ/0 read as p 0, "better", from two seeds. No verdict now, and no p (left out of
    the table's count of tests), as `unified_lora.stats.seed_difference` (compare) does; Δ 0 stays "equal"."""
    rep = load_benchmark("quality/report.py")
    for a, b in (([0.9, 0.8], [0.8, 0.7]), ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])):
        d = rep._delta(_cellruns(a), _cellruns(b), _acc)
        assert d[2] == "no spread: no verdict" and d[1] == 0 and d.p != d.p, d
        assert d[0] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert rep._delta(_cellruns([0.5, 0.6]), _cellruns([0.5, 0.6]), _acc)[2].startswith("equal")



def test_a_difference_at_float_rounding_with_no_spread_is_equal_not_without_a_verdict():
    """(found by the review) Cells that scored the same but for a float's last bits (0.1 + 0.2 against 0.3) read as
    "no spread: no verdict" beside a Δ of 6e-17: they are equal (Δ 0, p 1), as `unified_lora.stats.seed_difference`
    says too; a Δ beyond the rounding with no spread still gets no verdict."""
    rep = load_benchmark("quality/report.py")
    for a, b, sb, test in (([0.1 + 0.2, 0.5], [0.3, 0.5], None, "paired"),
                           ([0.1 + 0.2, 0.1 + 0.2], [0.3, 0.3], [2, 3], "Welch")):
        d = rep._delta(_cellruns(a), _cellruns(b, sb), _acc)
        assert d[2].startswith("equal") and d[0] == 0 and d.p == 1 and d.test == test, d
    assert rep._delta(_cellruns([0.3, 0.5]), _cellruns([0.3 - 1e-9, 0.5 - 1e-9]), _acc)[2] == "no spread: no verdict"

def test_only_seeds_present_in_both_cells_pair_and_they_pair_by_seed_not_by_position():
    rep = load_benchmark("quality/report.py")
    a = _cellruns([3, 4, 5])
    # b's runs listed as seeds 1, 2, 0 (a folder's file order is not seed order): by seed the differences are 2, 1, 3
    # (SE 0.577); by position they would be 0, 2, 4 (SE 1.155)
    shuffled = rep._delta(a, _cellruns([3, 2, 1], seeds=[1, 2, 0]), _acc)
    assert shuffled.test == "paired" and shuffled[1] == pytest.approx(1 / 3 ** 0.5)
    # seeds 0, 1, 2 against 0, 1, 3: no pairing; Welch with Welch–Satterthwaite df (here 4), t(0.975, 4) = 2.78
    w = rep._delta(a, _cellruns([1, 3, 2], seeds=[0, 1, 3]), _acc)
    assert (w[0], w.test, w.df) == (2, "Welch", pytest.approx(4.0))
    assert w[1] == pytest.approx((2 / 3) ** 0.5) and w[2].startswith("equal")
    # a seed twice in one cell: no pairing either
    assert rep._delta(a + a, _cellruns([1, 3, 2]), _acc).test == "Welch"


def test_above_the_majority_class_is_a_one_sample_t_at_n_minus_1_df():
    rep = load_benchmark("quality/report.py")
    # 0.6, 0.7, 0.8 against a 0.5 majority: 0.2 above it, SE 0.0577, t = 3.46: more than 2 SE, less than 4.30 SE
    assert not rep._above_majority(_cellruns([0.6, 0.7, 0.8]), _acc)
    assert rep._above_majority(_cellruns([0.68, 0.7, 0.72]), _acc)


def test_a_tables_multiplicity_line_counts_its_tests_and_applies_holm():
    rep = load_benchmark("quality/report.py")
    ds = [rep.Delta(0.1, 0.01, v, "paired", 2, 4.3, p) for v, p in
          (("better", 0.01), ("worse", 0.02), ("better", 0.04), ("equal (|Δ| ≤ t·SE)", 0.3))]
    assert rep._holm(ds) == 1  # 0.01 ≤ 0.05/4; 0.02 > 0.05/3
    line = rep._multiplicity(ds + [rep.Delta(float("nan"), float("nan"), "budgets differ: no verdict")])
    assert "makes 4 tests" in line and "about 0.2 *better/worse*" in line and "It gives 3; 1 survive" in line


# ------------------------------------------------------------------ another model than MiniLM: decoders
@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict:
    """A tiny GPT-2 and a tiny Llama (hidden 32) saved as sequence-classification-ready folders, each with a BPE
    tokenizer trained on MRPC sentences that, as the real ones ship, has no pad token (Llama's pads on the left)."""
    import torch
    from tokenizers import Tokenizer, decoders as tk_decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM, \
        LlamaTokenizerFast

    from unified_lora.data import load_glue

    texts = [t for e in load_glue("mrpc", "train").examples[:200] for t in (e.text_a, e.text_b)]
    root = tmp_path_factory.mktemp("decoders")

    def bpe(pre, dec, special, **model_kw):
        t = Tokenizer(models.BPE(**model_kw))
        t.pre_tokenizer, t.decoder = pre, dec
        t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
        return t

    gtok = GPT2TokenizerFast(tokenizer_object=bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                  tk_decoders.ByteLevel(), ["<|endoftext|>"]),
                             bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    ltok = LlamaTokenizerFast(tokenizer_object=bpe(pre_tokenizers.Metaspace(), tk_decoders.Metaspace(),
                                                   ["<unk>", "<s>", "</s>"], unk_token="<unk>"),
                              bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    assert gtok.pad_token is None and ltok.pad_token is None and ltok.padding_side == "left"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(gtok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=gtok.eos_token_id, eos_token_id=gtok.eos_token_id))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(ltok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=ltok.bos_token_id,
                                         eos_token_id=ltok.eos_token_id))
    for name, model, tok in (("gpt2", gpt2, gtok), ("llama", llama, ltok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


@pytest.mark.parametrize("kind,targets,layers", [("gpt2", "c_attn", 2), ("llama", "q_proj,v_proj", 4)])
def test_the_grid_runs_a_decoder_without_a_pad_token_on_its_own_targets_and_head(decoders, tmp_path, kind, targets,
                                                                                 layers):
    # the grid used to stop on the tokenizer ("Asking to pad but the tokenizer does not have a padding token"), and
    # its fixed query,value targets and `classifier` head exist on neither model
    assert load_benchmark("quality/run.py").main(_grid(decoders[kind], tmp_path, "--methods",
                                                       "lora_r8,adalora,unified_v1", "--conditions", "clean")) == 0
    for method in ("lora_r8", "adalora", "unified_v1"):
        res = json.loads((tmp_path / "runs" / f"mrpc__{method}__clean__s0.json").read_text())
        assert res["config"]["targets"] == targets and res["n_adapted_layers"] == layers, method
        assert res["head_params"] == 32 * 2, method  # the score head (32 -> 2, no bias) trains in every method
    assert json.loads((tmp_path / "runs" / "mrpc__adalora__clean__s0.json").read_text())["pruned"]


def test_the_grid_evaluates_left_padded_rows_whole(decoders):
    """Llama's tokenizer pads on the left; the padding trim used to keep a batch's first columns, which cut the end
    of every row (the token a decoder's head reads) and kept padding: predictions on other inputs, silently."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from unified_lora.training import load_tokenizer

    run = load_benchmark("quality/run.py")
    tok = load_tokenizer(str(decoders["llama"]))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(decoders["llama"], num_labels=5).eval()
    model.config.pad_token_id = tok.pad_token_id
    texts = ["the", "a plan was set", "shares rose in early trade on monday", "he said", "it was not",
             "the company said it expects revenue to fall this year", "no", "they agreed on the deal"] * 4
    enc = tok(texts, padding="max_length", max_length=24, return_tensors="pt")
    assert (enc["attention_mask"][:, 0] == 0).all()  # left padding, wider than every row
    with torch.no_grad():  # each row alone, unpadded: what the head must see
        alone = [int(model(**tok([t], return_tensors="pt")).logits.argmax(-1)) for t in texts]
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(alone)}
    assert len(set(alone)) > 1
    assert run.evaluate(model, batch, "sst2")["accuracy"] == 1.0


def test_a_target_that_names_no_layer_of_the_model_is_refused_before_anything_runs(decoders, tmp_path, capsys):
    # PEFT and setup_unified_lora adapt the names that match and skip the others: "c_attn,value" on GPT-2 would have
    # adapted c_attn alone under a budget that records both
    with pytest.raises(SystemExit):
        load_benchmark("quality/run.py").main(_grid(decoders["gpt2"], tmp_path, "--methods", "lora_r8", "--conditions",
                                                    "clean", "--targets", "c_attn,value"))
    err = capsys.readouterr().err
    assert "--targets: ['value'] name no Linear layer of gpt2 (model type 'gpt2')" in err and "'c_attn'" in err
    assert not list((tmp_path / "runs").glob("*.json"))


def test_two_models_in_folders_of_one_name_are_not_pooled(finished, tiny_model_dir, tmp_path):
    """A run records its model by its folder's name: two different models in folders named `model` were one cell."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    torch.manual_seed(1)  # the same shapes and tokenizer, other weights
    BertForSequenceClassification(BertConfig.from_pretrained(a)).save_pretrained(b)
    run = load_benchmark("quality/run.py")
    out = tmp_path / "out"
    assert run.main(_grid(a, out, "--methods", "lora_r8", "--conditions", "clean")) == 0
    with pytest.raises(SystemExit, match=r"mrpc__lora_r8__clean__s0.json exists with a different budget "
                                         r"\{'model_fingerprint': \('\w+', '\w+'\)\}"):
        run.main(_grid(b, out, "--methods", "lora_r8", "--conditions", "clean", "--seeds", "1"))
    # a run written before the fingerprint was recorded is compared by name, as it was: resumable, not refused
    old = out / "runs" / R8
    res = json.loads(old.read_text())
    del res["config"]["model_fingerprint"]
    old.write_text(json.dumps(res))
    assert run.main(_grid(b, out, "--methods", "lora_r8", "--conditions", "clean", "--seeds", "1")) == 0


@pytest.mark.parametrize("kind,targets", [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"])])
def test_the_perf_benchmarks_run_a_decoder_on_its_own_targets_and_head(decoders, tmp_path, kind, targets):
    import torch

    e2e = load_benchmark("perf/e2e.py")
    model, opt, ctrl, loader = e2e.build_arm("unified", str(decoders[kind]), 2, 32, 1)
    assert sorted({n.rsplit(".", 1)[-1] for n in ctrl._adapter_names}) == targets
    assert any(n.startswith("score.") and p.requires_grad for n, p in model.named_parameters())
    batch = next(e2e.batches(loader, 1))
    assert batch["attention_mask"].any(0).all()  # only columns that are padding in every row were cut, either side
    assert torch.isfinite(model(**batch).loss)
    # --quick keeps a given --model (it used to run the tiny random BERT under a command naming this model)
    payload = load_benchmark("perf/controller_overhead.py").main(["--quick", "--model", str(decoders[kind]),
                                                                  "--results-dir", str(tmp_path)])
    assert payload["setup"]["model"] == str(decoders[kind]) and payload["setup"]["targets"] == ",".join(targets)


def test_multitask_quality_refuses_a_model_that_is_not_bert(decoders, tmp_path, capsys):
    # it adapts BERT's module names, and BertForSequenceClassification.from_pretrained made a random BERT of a GPT-2
    # config (only a load report said so); a GPT-2 tokenizer without a pad token stopped it with a traceback first
    with pytest.raises(SystemExit):
        load_benchmark("multitask_quality.py").main(["--model", str(decoders["gpt2"]), "--task", "mrpc", "--pairs",
                                                     "same", "--seeds", "0", "--steps", "2", "--out", str(tmp_path)])
    assert "model type 'gpt2'; this benchmark adapts a BERT model's" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
