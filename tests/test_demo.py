"""The README's demo command works on a fresh clone: its data ship with the examples."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "demo.yaml"


def test_demo_config_points_at_data_that_ship():
    path = yaml.safe_load(CONFIG.read_text())["data"]["path"]
    data = ROOT / path  # `lightning-lisa fit --config examples/configs/demo.yaml` runs from the root
    assert data.is_file(), f"{path} is missing: the README's demo line would fail on a fresh clone"
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 800
    for record in records:
        user, assistant = (m["content"] for m in record["messages"])
        words = user.removeprefix("Reverse the order of the words: ").split()
        assert len(words) == 4 and assistant.split() == words[::-1]


def test_make_demo_runs_the_readme_line():
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "lightning-lisa fit --config examples/configs/demo.yaml" in demo
    assert "demo_data.py" not in demo  # nothing to write first
    assert "lightning-lisa fit --config examples/configs/demo.yaml" in (ROOT / "README.md").read_text()
