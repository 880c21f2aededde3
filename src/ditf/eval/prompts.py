"""Prompts of the correspondence benchmarks: one per image, from its category or from a captions file.

Modes: "empty" (""), "class" ("a photo of a {category}", the DiTF authors' eval_spair.py) and "caption"
(per-image captions in the DiTF authors' JSON format, {category + image file name: caption}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.keypoints import ImageRecord

PROMPT_MODES = ("empty", "class", "caption")
CLASS_PROMPT = "a photo of a {category}"


def load_captions(path: str | Path) -> dict[str, str]:
    """Per-image captions in the DiTF authors' format: a JSON object {category + image file name: caption}
    (e.g. "car2008_007466.jpg")."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file {path} does not exist; pass the JSON file given to --captions")
    try:
        captions = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"captions file {path} is not valid JSON ({err})") from err
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise DatasetError(
            f"captions file {path} must be a JSON object mapping '<category><image file name>' to a caption string"
        )
    return captions


def prompt_for(
    image: str, category: str, mode: str = "class", captions: Mapping[str, str] | None = None
) -> str:
    """The prompt for image file name `image` (e.g. "2008_007466.jpg") of `category`.

    mode "empty" -> "", "class" -> "a photo of a {category}", "caption" -> captions[category + image]
    (the DiTF authors' key format).
    """
    if mode == "empty":
        return ""
    if mode == "class":
        return CLASS_PROMPT.format(category=category)
    if mode == "caption":
        if captions is None:
            raise InvalidArgumentError("prompt mode 'caption' needs a captions mapping; pass --captions FILE")
        key = f"{category}{image}"
        if key not in captions:
            raise DatasetError(
                f"no caption for image {image} of category {category}: key {key!r} is not in the captions file "
                f"({len(captions)} keys); use --prompt-mode class or add the caption"
            )
        return captions[key]
    raise InvalidArgumentError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")


class PromptPolicy:
    """Chooses each image's prompt: `mode` in PROMPT_MODES, `captions` for mode "caption"."""

    def __init__(self, mode: str = "empty", captions: Mapping[str, str] | None = None):
        if mode not in PROMPT_MODES:
            raise InvalidArgumentError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
        if mode == "caption" and captions is None:
            raise InvalidArgumentError("prompt mode 'caption' needs captions; pass --captions FILE")
        self.mode = mode
        self.captions = captions

    def __call__(self, image: ImageRecord) -> str:
        return prompt_for(image.path.name, image.group, self.mode, self.captions)
