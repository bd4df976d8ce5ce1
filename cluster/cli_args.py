"""The engine flags of `cluster chat` and `cluster serve`, derived from EngineConfig's fields, so a new field, a
changed default or a new description shows in `--help` without touching the CLI. A flag the user did not give is
left out of the EngineConfig built from it: EngineConfig's defaults stay the one source.

Imports nothing heavy (no torch, no Ray): `cluster --help` stays fast.
"""
from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from cluster.config import EngineConfig

# a flag kept from before the derivation, beside the derived --no-enable-prefix-caching
NEGATIVE_ALIASES: dict[str, str] = {"enable_prefix_caching": "--no-prefix-caching"}
MODEL_HELP = "HF checkpoint dir, .gguf file or converted dir (default: embedded SmolLM2-135M-Instruct)"


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """`X | None` / Optional[X] -> (X, True); anything else -> (annotation, False)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _choice_parser(choices: list) -> Any:
    """The choice whose text is the argument: mixed choices (quant_policy's 0, 4, 8, 'fp8') parse as they are."""
    def parse(text: str) -> Any:
        for c in choices:
            if str(c) == text:
                return c
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(map(str, choices))})")

    return parse


def _argument(name: str, info) -> dict:
    """argparse add_argument(flag(name), **kw) for one EngineConfig field."""
    kind, _ = _unwrap(info.annotation)
    default = info.default
    help_text = info.description or name.replace("_", " ")
    if default is not None:
        help_text += f" (default: {default})"
    # default SUPPRESS: a flag not given leaves no attribute, so EngineConfig fills in its own default
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is Literal:
        choices = list(get_args(kind))
        kw["type"] = _choice_parser(choices)
        kw["choices"] = choices
    elif kind in (int, float, str):
        kw["type"] = kind
        kw["metavar"] = {int: "N", float: "F"}.get(kind, name.upper())
    else:
        raise TypeError(f"EngineConfig.{name}: no CLI flag for a field of type {info.annotation}")
    return kw


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """`model` (positional, optional) and one flag per EngineConfig field."""
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    group = p.add_argument_group("engine (EngineConfig)")
    for name, info in EngineConfig.model_fields.items():
        group.add_argument(flag(name), **_argument(name, info))
        if name in NEGATIVE_ALIASES:
            group.add_argument(NEGATIVE_ALIASES[name], dest=name, action="store_false", default=argparse.SUPPRESS,
                               help=f"same as --no-{flag(name)[2:]}")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig of the flags the user gave (pydantic validates them: a bad value is a ValueError naming it)."""
    given = {name: getattr(args, name) for name in EngineConfig.model_fields if hasattr(args, name)}
    return EngineConfig(**given)


def check_model(model: str | None) -> None:
    """Fail at once, in one line, for a model the engine could not load (a missing path, a directory that is no
    checkpoint): the checks the engine makes first, done before anything slow starts."""
    from cluster.convert.source import is_converted, resolve_source

    if not (model and is_converted(Path(model))):
        src = resolve_source(model)  # FileNotFoundError saying what MODEL may be
        if not src.gguf_file:  # a model type no family reads (convert/families.py, torch-free): ValueError
            import json

            from cluster.convert.families import check_supported

            check_supported(json.loads((src.path / "config.json").read_text()))
