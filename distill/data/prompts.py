"""Instruction prompts curated from real text on this machine: `python -m distill.data.prompts OUT.jsonl`.

Each section of Python's own documentation (`pydoc_data.topics`, 79 sections shipped with CPython)
gives two prompts, one asking for an explanation and one for an example: 158 prompts, one JSON object
per line with a "prompt" field, the input of `python -m launch.generate`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEMPLATES = (
    "Explain {title} in Python in a few sentences.",
    "Write a short Python example that shows {title}, with a one-line explanation.",
)


def pydoc_prompts() -> list[str]:
    from pydoc_data.topics import topics

    titles = [topics[key].strip().splitlines()[0].strip() for key in sorted(topics)]
    titles = [t[0].lower() + t[1:] if t[:2].istitle() else t for t in titles]  # "Assignment" -> "assignment"
    return [template.format(title=title) for title in titles for template in TEMPLATES]


def main(out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pydoc_prompts()))
    tmp.replace(path)
    print(f"{len(pydoc_prompts())} prompts -> {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m distill.data.prompts OUT.jsonl")
    main(sys.argv[1])
