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
