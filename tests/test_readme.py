"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("unified-lora demo") and "constraints.txt" in cmds[0]
    assert "pytest" in cmds[1] and "constraints.txt" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _setup_commands()[1] in ci


def test_constraints_pin_the_cpu_torch_and_the_package_keeps_a_range():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert '"torch>=' in (ROOT / "pyproject.toml").read_text()
