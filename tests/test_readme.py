"""The README's two set-up commands stay true: CI runs the test command verbatim; its section links resolve."""

import re
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


def test_constraints_pin_the_hugging_face_stack_to_what_is_installed_and_the_package_keeps_ranges():
    """CI and the README set-up install the versions the tests passed on; the library itself asks for ranges."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("transformers", "peft", "accelerate", "safetensors"):
        assert pins.get(name) == version(name), (name, pins.get(name), version(name))
        assert f'"{name}>=' in pyproject


def _prose_and_headings():
    """README.md without its fenced code blocks, and the GitHub anchor of each of its headings (lower case, the
    punctuation but `-` and `_` dropped, spaces to `-`; a repeated heading gets `-1`, `-2`, ...)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = "\n".join(part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)
    anchors, seen = {}, {}
    for level, title in re.findall(r"^(#{1,6}) (.+)$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors[slug if n == 0 else f"{slug}-{n}"] = len(level)
    return prose, anchors


def test_every_section_link_resolves_and_the_contents_line_links_every_section():
    """The README (2,400 lines) had no table of contents. Every `](#anchor)` link in it must name a heading, and
    the contents line under the introduction must link every `##` and `###` section."""
    prose, anchors = _prose_and_headings()
    links = re.findall(r"\]\(#([^)\s]+)\)", prose)
    assert links and not [a for a in links if a not in anchors], [a for a in links if a not in anchors]
    assert "**Contents:**" in prose, "README: no contents line"
    contents = prose.split("**Contents:**", 1)[1].split("\n\n", 1)[0]
    linked = set(re.findall(r"\]\(#([^)\s]+)\)", contents))
    assert {a for a, level in anchors.items() if level in (2, 3)} <= linked
