"""Text files people write by hand or export from spreadsheets: label and transcript CSVs."""
from __future__ import annotations

import os
from pathlib import Path

from features.errors import ConfigError

TEXT_ENCODINGS = ("utf-8-sig", "utf-16", "gb18030")  # what spreadsheet tools write MER CSVs in


def read_text(path: str | os.PathLike, key: str) -> str:
    """A small text file (a label or transcript CSV) in UTF-8 (BOM or not), UTF-16 with a BOM,
    or GB18030 (Chinese Excel's default, a superset of GBK), tried in that order."""
    raw = Path(path).read_bytes()
    for encoding in TEXT_ENCODINGS:
        if encoding == "utf-16" and raw[:2] not in (b"\xff\xfe", b"\xfe\xff"):
            continue  # without a BOM, UTF-16 would "decode" almost any bytes
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ConfigError(f"{key}: {path} is not text in any of {list(TEXT_ENCODINGS)}; save it as "
                      "UTF-8 CSV.")
