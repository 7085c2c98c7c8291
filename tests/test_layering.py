"""Layering: `orchestrator` -> `tasks` -> `db`, never upward (imports read with ast, lazy ones included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reconcile CLI still finds the embedded broker through orchestrator.stack; the broker discovery
# moving into tasks/ (issue 11, process side) removes this entry.
KNOWN_UPWARD = {"tasks/reconciler_cli.py"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def violations(package: str, forbidden: tuple[str, ...], allowed: set[str] = frozenset()) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in allowed:
            continue
        for name in imported_modules(path):
            if name.split(".")[0] in forbidden:
                found.append(f"{relative} imports {name}")
    return found


def test_tasks_never_import_the_web_tier():
    assert violations("tasks", ("orchestrator",), KNOWN_UPWARD) == []


def test_db_imports_neither_tasks_nor_the_web_tier():
    assert violations("db", ("tasks", "orchestrator", "gpu_worker")) == []


def test_recording_and_reconciler_do_not_import_each_other_both_ways():
    recording = imported_modules(ROOT / "tasks" / "recording.py")
    assert "tasks.reconciler" not in recording


@pytest.mark.parametrize("source", ["import orchestrator.app", "from orchestrator import replay",
                                    "def f():\n    from orchestrator.chain import send_chain\n"])
def test_the_check_sees_every_import_form(tmp_path, source):
    module = tmp_path / "m.py"
    module.write_text(source)
    assert any(name.split(".")[0] == "orchestrator" for name in imported_modules(module))


@pytest.mark.parametrize("subpackage", ["model", "checkpoints", "generation", "kernels", "codec"])
def test_only_the_gpu_workers_worker_package_knows_celery_the_pipeline_or_sql(subpackage):
    """The models, loaders, generation and kernels run without Celery, the task code or a database
    (benchmarks on a bare GPU machine import them); gpu_worker/worker/ is the glue."""
    assert violations(f"gpu_worker/{subpackage}", ("celery", "billiard", "kombu", "tasks", "db", "orchestrator")) == []


def test_the_models_import_no_other_gpu_worker_package():
    """gpu_worker/model/ sits below the loaders, the generation paths and the kernels: its one transformer
    block takes the fused kernels as ops from gpu_worker/generation/, never by importing them."""
    above = {f"gpu_worker.{sub}" for sub in ("checkpoints", "generation", "kernels", "codec", "worker")}
    found = [f"{path.relative_to(ROOT).as_posix()} imports {name}"
             for path in sorted((ROOT / "gpu_worker" / "model").rglob("*.py"))
             for name in imported_modules(path)
             if ".".join(name.split(".")[:2]) in above]
    assert found == []


def test_the_gpu_worker_keeps_no_loose_modules_beside_its_subpackages():
    assert sorted(p.name for p in (ROOT / "gpu_worker").glob("*.py")) == ["__init__.py"]
