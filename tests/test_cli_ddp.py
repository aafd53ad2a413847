"""`unified-lora train` under torchrun: DDP over 2 real processes (gloo, CPU), launched as a user launches it
(`python -m torch.distributed.run --nproc-per-node 2 ...`), on the tiny BERT and GPT-2 of test_cli.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_cli
import test_cli_precision
import test_cli_schedule
from test_cli import _ckpt_state, _same, _train_args
from test_cli_multitask import _table
from unified_lora.cli import main
from unified_lora.trace import read_trace

tiny = test_cli.tiny  # the tiny BERT, GPT-2 and data files of test_cli.py (a module-scoped fixture)
without_dropout = test_cli_precision.without_dropout  # the two with dropout off: gradients depend on the rows alone
CLI = str(Path(sys.executable).parent / "unified-lora")  # the console script, as `$(which unified-lora)`
# a shock and thresholds that make the controller change mode (test_cli's save_steps test): its decisions are tested
CONTROLLER = ("--lrs", "1e-2", "5e-3", "1e-3", "--shock-start", "3", "--shock-end", "6", "--shock-type", "random",
              "--theta0", "0.48", "--theta1", "0.497", "--threads", "1")


def _torchrun(*args, entry=("-m", "unified_lora.cli"), nproc: int = 2, wait: bool = True, log: Path | None = None,
              timeout: float = 300):
    """`torchrun --nproc-per-node N <entry> train ...` on this machine (gloo on the CPU), as a subprocess. Past
    `timeout` (a hang: processes waiting for each other) torchrun gets SIGTERM, on which it ends its workers (each in a
    session of its own: subprocess.run's SIGKILL of torchrun alone left them running), then TimeoutExpired."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *entry,
           *args]
    if not wait:
        f = open(log, "w")
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True), f
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _blocks(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_blocks.safetensors"))


def _decisions(trace: list[dict]) -> list[tuple]:
    return [(r["step"], r["mode"], r["rank"], r.get("transition"), r.get("snapshot")) for r in trace]


def _config(tmp_path: Path) -> str:
    # 7 of the 64 rows held out: 57 train rows, so an epoch's last batch of 8 rows holds 1, and with 2 processes one
    # of them trains on no row of it (a forward weighted 0)
    p = tmp_path / "run.yaml"
    p.write_text("dev_fraction: 0.11\n")
    return str(p)


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_two_processes_train_to_the_weights_and_decisions_of_one_process_on_both_their_rows(tiny, without_dropout,
                                                                                           tmp_path, model):
    """2 processes with --batch-size 4 --grad-accum 2 train on the rows one process takes with --batch-size 8
    --grad-accum 2, process r on its own half of each global batch: the same batches (the same seed, the same
    order), the same shock draws, each micro-batch's loss weighted by its rows' (a causal LM: target tokens') share
    of the step over both processes, so DDP's mean gradient is the one-process gradient. The weights end equal to
    float rounding (each process trims its own padding), the controller makes the same decisions on the same steps
    (its trace, written once, by process 0), and one set of outputs is written. The epoch's last global batch has 1
    row, so process 1 has none: it runs a forward weighted 0. Both evaluate inside the epochs too (--eval-steps), and
    --save-best writes best/ at the same evaluations (a collective save: both processes rank alike). The BERT runs
    decay a linear LR schedule over the run's optimizer steps, counted with the processes' global batches: the same 8
    steps, the same LR at each."""
    one, two = tmp_path / "one", tmp_path / "two"
    data = ["--model", without_dropout[model], "--data", tiny["csv"]]
    if model == "gpt2":  # rows of 2 to 10 words: their micro-batches hold different numbers of target tokens
        lm = tmp_path / "lm.csv"
        lm.write_text("text\n" + "".join(" ".join(test_cli.FILLER[(i + j) % len(test_cli.FILLER)]
                                                  for j in range(2 + i % 9)) + "\n" for i in range(64)))
        data = ["--model", without_dropout[model], "--data", str(lm), "--target-modules", "c_attn", "--loss-scale", "4"]
    schedule = ("--lr-scheduler", "linear", "--warmup-steps", "2") if model == "bert" else ()
    common = ("--config", _config(tmp_path), *data, "--max-length", "16", "--epochs", "2", "--grad-accum", "2",
              "--log-every", "0", "--eval-steps", "3", "--save-best", *CONTROLLER, *schedule)
    assert main(["train", *common, "--batch-size", "8", "--output-dir", str(one)]) == 0
    p = _torchrun("train", *common, "--batch-size", "4", "--output-dir", str(two))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = read_trace(one / "trace.jsonl"), read_trace(two / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(8))  # 57 rows: 8 global batches of 8, 2 per step; 2 epochs
    assert _decisions(b) == _decisions(a)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    if model == "bert":  # the controller went through a Mirror cycle: its decisions are part of the test
        assert {"MULTI->MIRROR", "MIRROR->MULTI"} <= {r.get("transition") for r in a}
    for key in ("loss", "phi"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6)
    for tag in ("epoch-1", "epoch-2"):
        wa, wb = _blocks(one / "checkpoints" / tag), _blocks(two / "checkpoints" / tag)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), (tag, k)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (sa["world_size"], sa["rows_per_step"], sb["world_size"], sb["rows_per_step"]) == (1, 16, 2, 16)
    assert sa["lr_schedule"] == sb["lr_schedule"] and sb["lr_schedule"]["total_steps"] == 8
    if model == "bert":
        want = [(1e-2, 5e-3, 1e-3)[r["mode"]] * f for r, f in zip(b, test_cli_schedule.factors("linear", 2, 8))]
        assert [r["lr"] for r in b] == pytest.approx(want, rel=1e-12, abs=0)
    # --eval-steps 3 with 4 steps an epoch: steps 3 and 6 inside the epochs, besides their ends
    assert sb["eval_points"] == sa["eval_points"] == ["epoch 0.75 (step 3)", "epoch 1", "epoch 1.5 (step 6)", "epoch 2"]
    for point, m in sa["arms"]["run"]["eval"].items():  # the dev evaluation, sharded over the processes
        assert sb["arms"]["run"]["eval"][point] == pytest.approx(m, rel=1e-4)
    # one set of outputs, written by process 0: one line per step in the trace, one console
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert sorted(x.name for x in (two / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    console = (two / "console.txt").read_text()
    assert console.count("unified-lora train:") == 1 and p.stdout.count("unified-lora train:") == 1
    assert "DDP: 2 processes (gloo), --batch-size 4 rows on each: 16 rows per optimizer step" in console
    st = torch.load(two / "checkpoints" / "epoch-2" / "state.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["process_rng"]) == 2
    assert sb["best"]["point"] == sa["best"]["point"] and sb["best"]["checkpoint"] == str(two / "best")
    best = torch.load(two / "best" / "state.pt", weights_only=True)
    assert best["world_size"] == 2 and len(best["process_rng"]) == 2
    assert console.count("new best dev ") == (one / "console.txt").read_text().count("new best dev ") >= 1


def _worker(tmp_path: Path) -> str:
    """A script that is the CLI itself under torchrun and, around it, writes to `tmp_path` its pid (`pid-RANK`, to be
    signalled) and, once `main` has returned, the names of the process's threads (`threads-RANK`, read by
    `_gloo_threads`; Linux's /proc names them: elsewhere none is written)."""
    child = tmp_path / "worker.py"
    child.write_text("import os, sys\n"
                     "from unified_lora.cli import main\n"
                     f"at = {str(tmp_path)!r}\n"
                     "open(os.path.join(at, 'pid-' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                     "code = main(sys.argv[1:])\n"
                     "tasks = os.listdir('/proc/self/task') if os.path.isdir('/proc/self/task') else []\n"
                     "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in tasks]\n"
                     "open(os.path.join(at, 'threads-' + os.environ['RANK']), 'w').write('\\n'.join(names))\n"
                     "sys.exit(code)\n")
    return str(child)


def _gloo_threads(tmp_path: Path) -> dict[int, list[str]]:
    """Each process's threads of gloo's (`gloo_tcp_loop`, `pt_gloo_runloop`) still running once `main` returned
    (`_worker`). `cmd_train` has destroyed the process group by then, which joins them: one left running runs on into
    the interpreter's shutdown, where a gloo thread that takes the GIL aborts the process ("terminate called without
    an active exception", SIGABRT: its exit code is not the run's)."""
    return {r: [n for n in (tmp_path / f"threads-{r}").read_text().split("\n") if "gloo" in n] for r in (0, 1)}


def _sigterm_process_1(tmp_path: Path, out: Path, *args: str, after: int = 3) -> list[str]:
    """`train *args --output-dir out` under torchrun (2 processes), SIGTERM to process 1's pid once the trace has
    `after` steps: both processes must stop at one step, exit 143 and leave one step-N checkpoint, the console
    saying how to resume, and no thread of gloo's left running as they exit (`_gloo_threads`). Its checkpoints'
    step-N names."""
    log = tmp_path / "torchrun.txt"
    p, f = _torchrun("train", *args, "--output-dir", str(out), entry=(_worker(tmp_path),), wait=False, log=log)
    try:
        trace, deadline = out / "trace.jsonl", time.monotonic() + 240
        while not (trace.is_file() and trace.read_text().count("\n") >= after) and p.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)
        assert p.wait(timeout=120) != 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        f.close()
    text = log.read_text()
    # both processes exit 143 of their own (the one torchrun stopped after the first exited too); the one traceback
    # is torchrun's own ChildFailedError, which reports that
    assert text.count("exitcode  : 143") == 2 and text.count("Traceback") == 1, text[-3000:]
    assert "ChildFailedError" in text and "unified-lora: error" not in text
    assert _gloo_threads(tmp_path) == {0: [], 1: []}
    console = (out / "console.txt").read_text()
    assert "SIGTERM on another process: saving a resumable checkpoint" in console
    resume = f"continue with: torchrun --nproc-per-node 2 $(which unified-lora) train --output-dir {out} --resume"
    assert resume in console
    saved = sorted(c.name for c in (out / "checkpoints").iterdir())
    steps = [n for n in saved if n.startswith("step-")]
    assert len(steps) == 1 and all(n.startswith(("step-", "epoch-")) for n in saved), saved
    return steps


def test_a_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_bit_for_bit(tiny, tmp_path, capsys):
    """SIGTERM reaching one process only (here process 1's pid; torchrun passes its own SIGTERM on to every
    process, each at its own point of a step): the processes agree after each step (an all-reduce of the flag), so
    both finish the same step, one step-N checkpoint is written (by process 0) and both exit 143. The resume under
    torchrun, launched with the console script as `$(which unified-lora)`, then ends exactly where an uninterrupted
    2-process run ends: trace, weights, optimizer, controller and every process's RNG state, bit for bit. A resume
    with another number of processes (one) is refused, naming both numbers: the checkpoint records how many trained
    it, and each step's global batch is batch_size x processes rows."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    opts = ("--batch-size", "4", "--max-length", "16", "--log-every", "0", *CONTROLLER)
    steps = _sigterm_process_1(tmp_path, out, "--model", tiny["bert"], "--data", tiny["csv"], *opts, "--epochs", "40")
    stopped = int(steps[0].split("-")[1])
    assert 3 <= stopped < 16 and len(read_trace(out / "trace.jsonl")) == stopped
    # another number of processes (its global batch would differ): refused before the model loads, naming both
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unified-lora: error: --resume {out / 'checkpoints' / steps[0]}: the run was trained by 2 "
                          "process(es), and this one has 1"), err
    assert "Resume it with torchrun --nproc-per-node 2" in err and err.count("\n") == 1
    # the uninterrupted run, and the resume, to 2 epochs (58 train rows, 8 rows a step: 8 steps each)
    q = _torchrun("train", "--model", tiny["bert"], "--data", tiny["csv"], *opts, "--epochs", "2",
                  "--output-dir", str(straight))
    assert q.returncode == 0, q.stderr[-3000:]
    r = _torchrun("train", "--output-dir", str(out), "--resume", "--epochs", "2", entry=(CLI,))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_trace(straight / "trace.jsonl"), read_trace(out / "trace.jsonl")
    assert [x["step"] for x in b] == list(range(16)) and b == a
    assert {x["mode"] for x in a} != {a[0]["mode"]}
    assert _same(_ckpt_state(out / "checkpoints" / "epoch-2"), _ckpt_state(straight / "checkpoints" / "epoch-2"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="the threads' names are read from Linux's /proc")
def test_each_process_has_stopped_gloo_threads_when_train_returns(tiny, tmp_path):
    """Under torchrun `cmd_train` destroys the process group before it returns, and with it gloo's threads: none may
    run on into the interpreter's shutdown (`_gloo_threads`). The group outlived destroy_process_group() once
    `torch.distributed.nn.functional` was imported after it was built (DDP's constructor imports it, through
    torch._dynamo): 10 of its functions' defaults, `group=group.WORLD`, held it, and its 3 threads ran on; one of the 2
    processes of the SIGTERM test aborted at exit so, once, on a busy machine. `init_distributed` imports it first."""
    p = _torchrun(*_train_args(tiny, tmp_path / "run", "--steps", "2", "--batch-size", "4", "--threads", "1"),
                  entry=(_worker(tmp_path),))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _gloo_threads(tmp_path) == {0: [], 1: []}


def test_a_checkpoint_process_0_cannot_write_stops_every_process_with_its_one_line_error(tiny, tmp_path):
    """Process 0 writes the checkpoint and hands the outcome to the others: a save that fails there (here
    `checkpoints` is a file) is the same one-line error, exit code 1, on both processes; neither waits for the other."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder\n")
    p = _torchrun(*_train_args(tiny, out, "--steps", "2", "--batch-size", "4", "--threads", "1"))
    error = f"unified-lora: error: {out / 'checkpoints' / 'step-2'}: cannot write this checkpoint"
    assert p.returncode != 0 and p.stderr.count(error) == 2, p.stderr[-3000:]
    assert p.stderr.count("exitcode  : 1 ") == 2


@pytest.fixture(scope="module")
def wide_without_dropout(tiny, tmp_path_factory) -> str:
    """test_cli_predict's wide BERT (its predictions vary by row) with its dropout off (see `without_dropout`)."""
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    path = tmp_path_factory.mktemp("wide-nodrop") / "bert"
    cfg = AutoConfig.from_pretrained(tiny["bert"], num_labels=2, initializer_range=0.5, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def several_tasks(wide_without_dropout, tmp_path_factory) -> dict:
    """Multi-task train on two data sets whose labels conflict (36 and 13 train rows, 20 and 11 dev rows): one process
    with --batch-size 8 --grad-accum 2 (`one`), and 2 processes under torchrun with --batch-size 4 (`two`)."""
    root = tmp_path_factory.mktemp("mt-ddp")
    rows = test_cli._rows(80, seed=5)
    pos, neg = rows[:36], [(t, 1 - y) for t, y in rows[36:49]]
    pos_dev, neg_dev = rows[49:69], [(t, 1 - y) for t, y in rows[69:80]]
    files = {n: _table(root / f"{n}.csv", r) for n, r in
             (("pos", pos), ("neg", neg), ("posdev", pos_dev), ("negdev", neg_dev))}
    one, two = root / "one", root / "two"
    common = ("--model", wide_without_dropout, "--data", files["pos"], files["neg"], "--dev-data", files["posdev"],
              files["negdev"], "--max-length", "16", "--epochs", "2", "--grad-accum", "2", "--log-every", "0",
              "--eval-steps", "3", "--controller-warmup", "2", "--lrs", "5e-3", "2e-3", "1e-3", "--threads", "1",
              "--theta1", "0.4")  # φ: 0.41 at step 3 (MIRROR), 0.39 at step 4 (back to MULTI)
    assert main(["train", *common, "--batch-size", "8", "--output-dir", str(one)]) == 0
    p = _torchrun("train", *common, "--batch-size", "4", "--output-dir", str(two))
    assert p.returncode == 0, p.stderr[-3000:]
    return {"one": one, "two": two, "stdout": p.stdout, "args": common}


def test_two_processes_train_several_tasks_to_the_weights_decisions_and_task_scores_of_one_process(several_tasks):
    """Multi-task train (two data sets whose labels conflict, 36 and 13 train rows) under torchrun: 2 processes with
    --batch-size 4 --grad-accum 2 against one process with --batch-size 8. A process's share of a global batch often
    holds more rows of a task than the other's, or none: each task's loss passed to the controller is weighted so
    its all-reduce (a mean over the processes that pass it) is the task's mean over the step's rows, as one process
    gives (`E[task]`, φ). The controller holds the shared adapter for 2 steps (SINGLE: its task gradients all-reduced
    across processes), then splits (MULTI), enters MIRROR (a snapshot) and leaves it (restored), on the same steps;
    the weights end equal
    to float rounding, each task's dev scores (sharded over the processes, 20 and 11 rows) are the same at every
    evaluation, and one set of outputs is written, a PEFT adapter per task. The epoch's last global batch has 1 row,
    so process 1 runs a forward weighted 0 there, which counts for no task."""
    one, two = several_tasks["one"], several_tasks["two"]
    a, b = read_trace(one / "trace.jsonl"), read_trace(two / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(8))  # 49 rows: 7 global batches of 8, 2 per step; 2 epochs
    assert _decisions(b) == _decisions(a)
    assert [r["mode"] for r in a] == [0, 0, 1, 2, 1, 1, 1, 1]
    assert (a[3]["snapshot"], a[4]["snapshot"]) == ("saved", "restored")
    assert [r["components"]["topology"] for r in a[:3]] == ["shared", "shared", "task"]
    for key in ("loss", "phi"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6)
    for ra, rb in zip(a, b):  # the signal's parts: each task's loss EMA, the gradient conflict, the drift
        ca, cb = ra["components"], rb["components"]
        keys = [k for k in ca if k.startswith("E[") or k in ("C", "C_grad", "S", "drift")]
        assert {"E[pos]", "E[neg]"} <= set(keys) and [cb.get(k) is None for k in keys] == [ca[k] is None for k in keys]
        keys = [k for k in keys if ca[k] is not None]
        assert [cb[k] for k in keys] == pytest.approx([ca[k] for k in keys], rel=1e-4, abs=1e-6), ra["step"]
    for tag in ("epoch-1", "epoch-2"):
        wa, wb = _blocks(one / "checkpoints" / tag), _blocks(two / "checkpoints" / tag)
        assert wa.keys() == wb.keys() and any(".lora_tasks.1." in k for k in wa)
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), (tag, k)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (sa["world_size"], sa["rows_per_step"], sb["world_size"], sb["rows_per_step"]) == (1, 16, 2, 16)
    assert sb["eval_points"] == sa["eval_points"] == ["epoch 0.75 (step 3)", "epoch 1", "epoch 1.5 (step 6)", "epoch 2"]
    ea, eb = sa["arms"]["run"]["eval"], sb["arms"]["run"]["eval"]
    assert {"pos/accuracy", "neg/macro_f1", "average"} <= set(ea["epoch 2"])
    for name in ("pos", "neg"):  # not a constant prediction (scored as the majority class): they vary by row
        assert ea["epoch 2"][f"{name}/macro_f1"] > sa["majority"][f"{name}/macro_f1"]
    for point, m in ea.items():  # the dev evaluation, sharded over the processes
        assert eb[point] == pytest.approx(m, rel=1e-6), point
    assert sb["tasks"] == [dict(t) for t in sa["tasks"]]
    assert sb["best"]["point"] == sa["best"]["point"]
    # one set of outputs, written by process 0: a PEFT adapter per task, one console
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert sorted(x.name for x in (two / "peft_adapter").iterdir()) == ["neg", "peft_tasks.json", "pos"]
    console = (two / "console.txt").read_text()
    assert console.count("unified-lora train:") == 1 and several_tasks["stdout"].count("unified-lora train:") == 1
    assert console.count("task neg: ") == 1 and "DDP: 2 processes (gloo)" in console


def test_several_tasks_resumed_under_torchrun_end_bit_for_bit_where_the_uninterrupted_run_ends(several_tasks,
                                                                                                tmp_path):
    """The 2-process multi-task run resumed under torchrun from its epoch-1 checkpoint (step 4: the task adapters,
    split at step 2, the router, the multi-task controller with the Mirror snapshot it took at step 3, and both
    processes' RNG states) leaves MIRROR at its first step, restoring that snapshot, and trains on to the
    uninterrupted run's trace, evaluations and epoch-2 checkpoint, bit for bit."""
    two, out = several_tasks["two"], tmp_path / "run"
    shutil.copytree(two, out)
    shutil.rmtree(out / "checkpoints" / "epoch-2")
    p = _torchrun("train", "--output-dir", str(out), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from " in (out / "console.txt").read_text()
    assert read_trace(out / "trace.jsonl") == read_trace(two / "trace.jsonl")
    assert _same(_ckpt_state(out / "checkpoints" / "epoch-2"), _ckpt_state(two / "checkpoints" / "epoch-2"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, out))
    assert sb["arms"]["run"]["eval"] == sa["arms"]["run"]["eval"]


def test_several_tasks_stopped_by_a_sigterm_under_torchrun_resume_bit_for_bit(several_tasks, tmp_path):
    """The multi-task counterpart of the one-task SIGTERM test: the 2-process run of `several_tasks` (2 epochs) started
    for 40 epochs and SIGTERMed on process 1 after 2 steps (where the controller splits the tasks): both processes stop
    at one step and write one step-N checkpoint (the task adapters, router, multi-task controller, every process's
    RNG), and the resume under torchrun to 2 epochs ends at the uninterrupted run's trace, evaluations and epoch-2
    checkpoint, bit for bit."""
    two, out = several_tasks["two"], tmp_path / "run"
    args = list(several_tasks["args"])
    args[args.index("--epochs") + 1] = "40"
    steps = _sigterm_process_1(tmp_path, out, *args, "--batch-size", "4", after=2)
    stopped = int(steps[0].split("-")[1])
    assert 2 <= stopped < 8 and len(read_trace(out / "trace.jsonl")) == stopped
    p = _torchrun("train", "--output-dir", str(out), "--resume", "--epochs", "2", entry=(CLI,))
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_trace(out / "trace.jsonl") == read_trace(two / "trace.jsonl")
    assert _same(_ckpt_state(out / "checkpoints" / "epoch-2"), _ckpt_state(two / "checkpoints" / "epoch-2"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, out))
    assert sb["arms"]["run"]["eval"] == sa["arms"]["run"]["eval"] and sb["tasks"] == sa["tasks"]
