"""pipeline/ is the engine: it never imports dagster, directly or through a dependency."""

import ast
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def test_no_module_in_pipeline_imports_dagster():
    offenders = []
    for path in PIPELINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert offenders == []


def test_importing_every_pipeline_module_loads_no_dagster():
    modules = sorted(
        ".".join(p.relative_to(PIPELINE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PIPELINE.rglob("*.py")
    )
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert len(modules) >= 8


STAGES = ("scoring", "pyramid", "privacy", "select", "vector", "geojson", "geoparquet", "tilemath")


def test_the_stages_take_frames_and_the_plan_not_the_config_or_the_warehouse():
    # build.py and publish.py read files and hand frames to these; none loads YAML or opens the warehouse
    code = "import importlib, sys\n" + "".join(f"importlib.import_module('pipeline.{m}')\n" for m in STAGES)
    code += "print(sorted(m for m in ('pipeline.config', 'pipeline.warehouse', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_pipeline_turns_off_numpys_huge_pages_and_gives_pyarrow_the_system_allocator():
    """Set whether numpy and pyarrow were loaded first or not, and never over what the user chose."""
    import os

    probe = (
        "import numpy, pyarrow, pipeline\n"
        "from numpy._core import multiarray\n"
        "print(multiarray._set_madvise_hugepage(False), pyarrow.default_memory_pool().backend_name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NUMPY_MADVISE_HUGEPAGE", "ARROW_DEFAULT_MEMORY_POOL")}
    run = lambda **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env={**env, **extra}
    ).stdout.split()
    assert run() == ["False", "system"]  # loaded before pipeline: applied all the same
    assert run(NUMPY_MADVISE_HUGEPAGE="1", ARROW_DEFAULT_MEMORY_POOL="mimalloc") == ["True", "mimalloc"]
