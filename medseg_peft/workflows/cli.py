"""Command-line keys: a misspelt ``--epoch 1`` would otherwise add a new key and run the default 12 epochs;
an unknown key is an error naming the nearest valid one, before any work."""

from __future__ import annotations

import difflib
import sys

from medseg_peft.data.bundle_errors import under_monai_bundle

RUN_ARGS = {"config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking", "args_file", "workflow_type",
            "properties_path"}


def _config_ids(config: dict | list, prefix: str = "") -> set[str]:
    """Every ID of a config, nested ones included: list items by index (``train#preprocessing#transforms#7``)."""
    ids = set()
    for key, value in (config.items() if isinstance(config, dict) else enumerate(config)):
        ident = f"{prefix}#{key}" if prefix else str(key)
        ids.add(ident)
        if isinstance(value, (dict, list)):
            ids |= _config_ids(value, ident)
    return ids


def cli_keys(argv: list[str]) -> list[str]:
    """The ``--key`` names of a ``monai.bundle run`` command line (``--key value`` or ``--key=value``)."""
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def unknown_keys(keys: list[str], config: dict) -> dict[str, list[str]]:
    """``{key: nearest valid keys}`` for every key that is not in ``config`` (a nested key needs its parent)."""
    valid = _config_ids(config)
    bad = {}
    for key in keys:
        key = key.replace("::", "#")
        if key in RUN_ARGS or key in valid:
            continue
        parent = key.rpartition("#")[0]
        if parent and parent in valid:
            continue  # a new setting of an existing component: the component checks its own arguments
        bad[key] = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
    return bad


def check_cli_keys(argv: list[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``: refuse command-line keys the bundle does not have."""
    argv = sys.argv if argv is None else argv
    if not under_monai_bundle(argv):
        return  # not the MONAI command line (a notebook, a test, the Python API)
    from monai.bundle import ConfigParser

    files = next((argv[i + 1] for i, a in enumerate(argv) if a == "--config_file" and i + 1 < len(argv)), None)
    files = next((a.split("=", 1)[1] for a in argv if a.startswith("--config_file=")), files)
    if files is None:
        return
    try:
        import ast

        names = ast.literal_eval(files) if files.strip().startswith("[") else files
    except (ValueError, SyntaxError):
        names = files
    config = ConfigParser.load_config_files(names)
    bad = unknown_keys(cli_keys(argv[1:]), config)
    if bad:
        lines = [f"--{k}" + (f" (did you mean {', '.join('--' + m for m in near)}?)" if near else "") for k, near in bad.items()]
        raise ValueError("unknown setting(s) for this bundle: " + "; ".join(lines))


__all__ = ["RUN_ARGS", "check_cli_keys", "cli_keys", "unknown_keys"]
