"""The small file-reading pieces that loaders with and without MindSpore share (the tokenizers import no
MindSpore, so these cannot live in models/loading.py)."""

import json
from pathlib import Path
from typing import Type

RESTORE = "copy it again from the checkpoint it came from"


class CheckpointError(ValueError):
    """A checkpoint folder exists but its config or weights do not describe the requested model."""


def read_json_object(path: Path, error: Type[ValueError] = CheckpointError) -> dict:
    """A JSON file that must hold an object: missing, unparsable (truncated) or other JSON is refused, with
    `error` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the pipeline folder is incomplete; {RESTORE}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as cause:
        raise error(f"{path} is not valid JSON ({cause}): it is damaged or truncated; {RESTORE}") from cause
    if not isinstance(content, dict):
        raise error(f"{path} holds a JSON {type(content).__name__}, not an object; {RESTORE}")
    return content
