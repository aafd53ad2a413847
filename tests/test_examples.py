"""The shipped examples run, each in its own process as a user runs it, and print what their docstrings promise."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unified_lora.data import loaders

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args: str, launcher=(sys.executable,), timeout: int = 240) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # its own session, so a hang is killed whole: torchrun's workers would outlive the launcher otherwise
    p = subprocess.Popen([*launcher, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{args[0]} ran past {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    assert p.returncode == 0, f"{args[0]} exited {p.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return out


# Each case runs as `python examples/NAME ARGS` runs it (the script as __main__ with its sys.argv, examples/ first
# on sys.path), its stdout, stderr and exit status recorded as a shell sees them: a SystemExit's code, 1 and the
# traceback on stderr for an exception. All cases share one fresh interpreter (one import of torch and transformers,
# not one per case): the --help and bad-argument cases stop in argparse, before the examples do any work.
_RUN_CASES = r"""
import contextlib, io, json, os, runpy, sys, traceback
sys.path.insert(0, os.path.abspath("examples"))
results = []
for script, *args in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["examples/" + script, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.__stdout__)
"""
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
BAD_ARGUMENTS = [
    (("multitask_glue.py", "--batch", "0"), "--batch must be at least 1, got 0"),
    (("multitask_glue.py", "--mix", "--batch", "15"), "multiple of the 2 tasks, got 15"),
    (("multitask_glue.py", "--dev-max", "-1"), "--dev-max must be at least 0, got -1"),
    (("multitask_glue.py", "--tasks", "foo", "mrpc"), "unknown GLUE task 'foo'"),
    (("trainer_callback.py", "--steps", "0"), "--steps must be at least 1, got 0"),
    (("peft_interop.py", "--tiny", "--steps", "-1"), "--steps must be at least 0, got -1"),
    (("qlora_trainer.py", "--tiny", "--examples", "0"), "--examples must be at least 1, got 0"),
    (("qlora_trainer.py", "--compute-dtype", "float16"), "argument --compute-dtype: invalid choice: 'float16'"),
    (("fsdp2_torchrun.py", "--tiny", "--save-at", "80"), "--save-at must be between 0 (no checkpoint) and --steps - 1"),
    (("fsdp2_torchrun.py", "--tiny", "--resume", "no_such_dir"), "--resume no_such_dir: no sharded checkpoint there"),
]


@pytest.fixture(scope="module")
def argparse_runs() -> dict:
    """{(script, *args): {"returncode", "stdout", "stderr"}} of every --help and bad-argument case, from one process."""
    cases = [(e, "--help") for e in EXAMPLES] + [args for args, _ in BAD_ARGUMENTS]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-c", _RUN_CASES], input=json.dumps(cases), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(zip(cases, json.loads(p.stdout)))


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_answers_help_without_running(example, argparse_runs):
    r = argparse_runs[example, "--help"]
    assert r["returncode"] == 0, r["stderr"][-3000:]
    assert r["stdout"].startswith("usage:") and "transitions:" not in r["stdout"]  # ddp_torchrun.py ran 80 steps


@pytest.mark.parametrize("args, error", BAD_ARGUMENTS)
def test_examples_refuse_bad_arguments_with_one_usage_error_line(args, error, argparse_runs):
    r = argparse_runs[args]
    # they used to crash in torch (`max(): Expected reduction dim`), in random.sample, with a traceback, or (the
    # Trainer at max_steps=0) to run one step anyway
    assert r["returncode"] == 2 and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith(f"{args[0]}: error: ") and error in last, last


def test_trainer_callback_example(tmp_path):
    out = run_example("examples/trainer_callback.py", "--output-dir", str(tmp_path))  # not a new folder in /tmp each run
    assert "16 controller steps" in out
    rows = [line.split() for line in out.split("(from trainer.state.log_history)")[1].splitlines() if line.strip()][:-1]
    assert [int(r[0]) for r in rows] == [4, 8, 12, 16]  # φ, mode, rank and LR logged at each logging step


def test_peft_interop_example_gives_identical_logits_at_every_rank():
    out = run_example("examples/peft_interop.py", "--tiny")
    for rank in (4, 8, 16):
        assert f"rank {rank:>2}: max |ours - PEFT| = 0.00e+00" in out
    assert "import r8 into nested layers" in out and "max diff 0.00e+00" in out


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
# --standalone: a rendezvous on a free local port, not the fixed 29500 that another job may hold
TWO_PROCESSES = (TORCHRUN, "--standalone", "--nproc_per_node", "2")
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not on PATH")


@needs_torchrun
def test_ddp_example_under_torchrun_keeps_both_processes_in_lockstep():
    out = run_example("examples/ddp_torchrun.py", launcher=TWO_PROCESSES, timeout=180)
    assert "2 process(es), weights identical on all: True" in out
    assert "transitions: [" in out and "transitions: []" not in out
    switches = [line for line in out.splitlines() if "(SINGLE->MULTI)" in line or "(MULTI->SINGLE)" in line]
    assert switches and len(switches) == len(set(switches))  # the controller's console lines print on one process


def test_ddp_example_runs_in_one_process_without_torchrun():
    out = run_example("examples/ddp_torchrun.py")  # "python examples/ddp_torchrun.py  # one process works too"
    assert "1 process(es), weights identical on all: True" in out
    assert "transitions: [" in out and "transitions: []" not in out


def _digest(out: str) -> str:
    return out.split("adapter digest after 80 steps: ")[1].split()[0]


@needs_torchrun
def test_fsdp2_example_under_torchrun_runs_a_mirror_cycle_in_lockstep_and_resumes_bit_for_bit(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = run_example("examples/fsdp2_torchrun.py", "--tiny", "--checkpoint-dir", str(ckpt), launcher=TWO_PROCESSES,
                      timeout=180)
    assert "2 process(es), steps 0-80, in lockstep at every step" in out  # assert_lockstep held at every step
    assert "'MULTI->MIRROR', 'saved')" in out and "'MIRROR->MULTI', " in out  # a Mirror cycle on the shards
    assert f"checkpoint of step 40: {ckpt}" in out
    assert {p.name for p in ckpt.iterdir()} >= {".metadata", "ctrl.pt"}
    resumed = run_example("examples/fsdp2_torchrun.py", "--tiny", "--resume", str(ckpt), launcher=TWO_PROCESSES,
                          timeout=180)
    assert f"resumed from {ckpt} at step 40" in resumed and "steps 40-80" in resumed
    assert "MULTI->MIRROR" in resumed  # the cycle after the checkpoint happens again
    assert _digest(resumed) == _digest(out)  # the gathered LoRA blocks are the uninterrupted run's, bit for bit


def test_fsdp2_example_runs_in_one_process_without_torchrun():
    out = run_example("examples/fsdp2_torchrun.py", "--tiny", "--save-at", "0")  # a process group of one
    assert "1 process(es), steps 0-80, in lockstep at every step" in out
    assert "'MULTI->MIRROR', 'saved')" in out and "checkpoint of step" not in out


def test_qlora_trainer_example_trains_a_4bit_base_and_exports_a_peft_adapter(tmp_path):
    out = run_example("examples/qlora_trainer.py", "--tiny", "--output-dir", str(tmp_path))
    assert "16 controller steps" in out
    rows = [line.split() for line in out.split("(from trainer.state.log_history)")[1].splitlines() if line.strip()][:4]
    assert [int(r[0]) for r in rows] == [4, 8, 12, 16]  # φ, mode, rank and LR logged at each logging step
    assert "13 4-bit layers (4 with nested LoRA), packed weights unchanged: True" in out
    assert f"PEFT adapter (rank 8) in {tmp_path / 'adapter'}" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8  # the query and value layers of both encoder layers, by full name
    assert sorted(t.rsplit(".", 1)[1] for t in config["target_modules"]) == ["query", "query", "value", "value"]
    assert "classifier" in config["modules_to_save"]  # (PEFT adds "score" for a SEQ_CLS task itself)


@pytest.mark.skipif(loaders._find_shared_glue() is None, reason="SST-2 comes from shared/data/glue (only MRPC ships)")
def test_multitask_example_runs_all_three_arms(tmp_path):
    # --threads 1 (the example's default is 2, which beside the other test worker on 2 cores took 3 times as long)
    # and batches of 4: the same paths, a third of the time
    out = run_example("examples/multitask_glue.py", "--arm", "all", "--steps", "6", "--dev-max", "16", "--batch", "4",
                      "--threads", "1", "--out", str(tmp_path / "mt.json"))
    for arm in ("shared", "multi", "unified", "majority"):
        assert any(line.startswith(arm) and "sst2: accuracy=" in line for line in out.splitlines()), arm
    runs = json.loads((tmp_path / "mt.json").read_text())
    for r in runs:  # 6 steps: the first and the last 10 are the same six losses of a fresh 2-class head, near ln 2
        assert r["loss_first10"] == r["loss_last10"]
        assert abs(r["loss_first10"] - math.log(2)) < 0.15, r["loss_first10"]  # was the sum of 6 losses / 10: 0.41
