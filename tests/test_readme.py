"""Every command in the README runs: its fenced bash blocks, in order, on the embedded sample.

The two set-up scripts are CI's own commands (`.ci/run` runs the tests; tests/test_demo.py the
demo); every other line must be an `ibot` command, and it runs as written in a scratch folder
that sees the repository's `data/` and `configs/`, with tiny overrides appended so that the
whole tour takes a minute: a README whose command does not run, or runs into a missing flag,
fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"bash scripts/demo.sh", "bash scripts/test.sh"}

# Appended to each command (dotted overrides come last on every `ibot` command line).
_MODEL = [o for o in tiny_overrides(Path("."), Path(".")) if not o.startswith(("data.path=", "train.output_dir="))]
_TINY = {
    ("pretrain",): [*_MODEL, "train.max_steps=2", "eval.monitor_every_minutes=0"],
    ("distill",): [*_MODEL, "train.max_steps=2", "eval.monitor_every_minutes=0"],
    ("eval", "probe"): ["eval.probe_epochs=1", "eval.probe_lrs=[1e-3]"],
}


def readme_commands(text: str) -> list[str]:
    """The command lines of the README's ```bash blocks (continuations joined, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_commands_are_setup_scripts_or_ibot() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    assert SCRIPTS <= set(commands)
    others = [c for c in commands if c not in SCRIPTS and not c.startswith("ibot ")]
    assert not others, f"README commands no test runs: {others}"


def test_every_readme_ibot_command_runs_on_the_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ibot.cli import main

    for name in ("data", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the file-index cache stays in the scratch folder
    ran = []
    for command in readme_commands((ROOT / "README.md").read_text()):
        if command in SCRIPTS:
            continue
        words = shlex.split(command)[1:]
        extra = next((v for k, v in _TINY.items() if tuple(words[: len(k)]) == k), [])
        assert main([*words, *extra, *(["--no-progress"] if _takes_no_progress(words) else [])]) == 0, command
        ran.append(words[0])
    assert {"pretrain", "distill", "eval", "embed", "export", "visualize", "report", "stats"} <= set(ran)
    assert (tmp_path / "exports" / "mine-onnx" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "mine" / "report.html").is_file()


def _takes_no_progress(words: list[str]) -> bool:
    return words[0] in ("pretrain", "distill", "embed") or words[:1] == ["eval"]
