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


def run(main: Callable[[], object]) -> None:
    """`python -m stages.<stage>` (what dvc.yaml runs): a MerError is a message for the user,
    printed as `<stage>: error: <message>` without a traceback, and the exit status is 1."""
    try:
        main()
    except MerError as err:
        print(f"{Path(sys.argv[0]).stem}: error: {err}", file=sys.stderr)
        sys.exit(1)


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
