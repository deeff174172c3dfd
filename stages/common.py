"""What every stage entry shares: reading its params.yaml section and setting up logging."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from features.errors import ConfigError, MerError


def load_params(section: str, path: str | os.PathLike = "params.yaml") -> Any:
    """One top-level section of params.yaml (dotted names reach deeper: ``embed.encoders``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run stages from the project root.")
    node: Any = yaml.safe_load(path.read_text()) or {}
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{path}: no section {section!r} (missing {part!r}).")
        node = node[part]
    return node


def guard(main: Callable[[], object], prog: str) -> int:
    """The exit status of `main` (0 unless it returns an int): a MerError is a message for the
    user, printed as `<prog>: error: <message>` without a traceback, and the status is 1."""
    try:
        status = main()
    except MerError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


def run(main: Callable[[], object]) -> None:
    """`python -m stages.<stage>` (what dvc.yaml runs): `main` under `guard`, named by its file."""
    status = guard(main, Path(sys.argv[0]).stem)
    if status:
        sys.exit(status)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup() -> None:
    logging.basicConfig(level=os.environ.get("MER_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    # Offline by default: nothing is fetched from a hub unless the user opts in.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
