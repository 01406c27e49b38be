"""The compare command's input: config files, method layers and bundle settings, each checked before any run.

Every problem found here is a :class:`CompareError`, printed by the command as one line before anything
runs: a typo in a method or a missing file must not surface after an hour of the first method's training.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
DEFAULT_METHODS = "fps,gps,spt,partial,lora,full"
METHOD_ORDER = ("fps", "gps", "spt", "partial", "lora", "full", "random", "decoder")


class CompareError(ValueError):
    """A problem with the command's input or its folders: printed as one line, before any run starts."""


def method_rank(method: str) -> int:
    """A method's place in tables and listings: the usual order first, any other method after them."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def config_files(value: str) -> list[str]:
    """``bundles/polyp_fps.json`` or a MONAI list ``"['a.json','b.json']"``; every file must exist."""
    try:
        files = ast.literal_eval(value) if value.strip().startswith("[") else [value]
    except (ValueError, SyntaxError) as err:
        raise CompareError(f"--config_file {value!r} is neither a file nor a list of files ({err})") from err
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CompareError(f"config file {missing[0]} does not exist")
    return [str(f) for f in files]


def method_layers(files: list[str]) -> dict[str, Path]:
    """``{method: layer file}``: the package's layers, and those beside the config (``<its folder>/methods``) first."""
    layers = {}
    for folder in (PACKAGE_BUNDLES / "methods", Path(files[0]).parent / "methods"):
        layers.update({p.stem: p for p in sorted(folder.glob("*.json"))})
    return layers


def methods(value: str, layers: dict[str, Path]) -> list[str]:
    names = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in names if m not in layers]
    if unknown or not names:
        raise CompareError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: the layers available are "
                           f"{', '.join(sorted(layers, key=method_rank))}")
    return names


def overrides(tokens: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs, kept as typed: they go to every run's command line as they are."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise CompareError(f"unexpected argument {token!r}: bundle settings are given as --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise CompareError(f"--{key} needs a value")
            i, value = i + 1, tokens[i + 1]
        out[key], i = value, i + 1
    return out


def beside(files: list[str], name: str) -> str | None:
    """``name`` beside the first config file, else the package's (the metadata and logging files of a task)."""
    for folder in (Path(files[0]).parent, PACKAGE_BUNDLES):
        if (folder / name).is_file():
            return str(folder / name)
    return None
