"""The import rule of docs/architecture.md: arrows point down the floors, trainer never imports ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schema", "data_pipeline", "trainer", "cluster", "compositor", "launch")
# What each package may import from the project (besides itself).
ALLOWED = {
    "schema": set(),
    "data_pipeline": {"schema"},
    "trainer": {"schema", "data_pipeline"},
    "cluster": {"schema", "data_pipeline", "trainer"},
    "compositor": {"schema", "data_pipeline", "trainer"},
    "launch": {"schema", "data_pipeline", "trainer", "cluster", "compositor"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names (function-level imports too), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_arrows_point_down_the_floors():
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imports_of(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module}")
                if package in ("schema", "data_pipeline", "trainer") and top == "ray":
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports ray")
    assert wrong == []


def test_reading_a_config_loads_no_heavy_library(tmp_path):
    """The ground floor stays light: loading a job file imports neither torch, transformers nor ray."""
    job = tmp_path / "job.yaml"
    job.write_text("name: light\ndata: {train: {path: rows.jsonl}}\nforgetting: {lwf: {weight: 0.5, temperature: 1.0, on: task}}\n")
    code = (
        "import sys; from schema.loading import load_job_config; "
        f"config = load_job_config({str(job)!r}); assert config.forgetting.lwf.on == 'task'; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
