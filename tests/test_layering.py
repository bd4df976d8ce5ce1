"""Layering: the engine imports no worker (Ray-side) code, and the modules the serving worker imports at its top
(cluster.executor, cluster.engine.build) import no torch, so importing the worker stays cheap where torch is not."""
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "cluster" / "engine"


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ENGINE.parents[1])
    return set(out.stdout.split())


def test_the_engine_imports_no_worker_code():
    loaded = _modules_after("import cluster.engine.engine, cluster.engine.async_engine")
    assert "cluster.engine.engine" in loaded and "cluster.executor" in loaded
    assert not [m for m in loaded if m.startswith("cluster.workers")]


def test_no_engine_file_names_the_workers():
    for path in sorted(ENGINE.glob("*.py")):
        assert "cluster.workers" not in path.read_text(), f"{path.name} mentions cluster.workers"


def test_the_executor_factory_imports_no_torch():
    loaded = _modules_after("import cluster.executor, cluster.engine.build")
    assert "torch" not in loaded
