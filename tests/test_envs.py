"""envs/requirements.txt (pip, README, CI) and envs/lmcflow.yaml (conda rules) pin the same set."""

import re

import yaml

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {re.split("==", line)[0].lower(): line.split("==")[1] for line in lines}


def test_conda_env_pins_what_requirements_pin():
    req = [line.strip() for line in (REPO / "envs/requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    env = yaml.safe_load((REPO / "envs/lmcflow.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert all("==" in line for line in req), "every requirement is pinned exactly"
    assert _pins(req) == _pins(pip)
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_every_rule_names_the_conda_env():
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        if smk.name != "common.smk":
            assert text.count("conda:") == len(rules), f"{smk.name}: a rule without conda:"
