"""The README documents the repository as it is: its params table lists every key of
params.yaml with the value params.yaml gives it, and it points at no file outside the repository."""

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def split_top_level(text: str) -> list[str]:
    """'a, [1, 2], {b: c}, "x, y"' -> ['a', '[1, 2]', '{b: c}', '"x, y"']."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    return [*parts, current.strip()] if current.strip() else parts


def readme_params() -> dict[str, str]:
    """'section.key' -> the default cell's text, from the "Params reference" table."""
    text = README.read_text()
    section_text = text.split("## Params reference", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    section = ""
    for line in section_text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] == "section" or set(cells[1]) <= {"-"}:
            continue  # not a row, the header, or the |---| line
        section = cells[0] or section
        keys = split_top_level(cells[1])
        values = split_top_level(cells[2].replace("`", ""))
        assert len(keys) == len(values), f"README row {line!r}: {keys} but {values}"
        for key, value in zip(keys, values, strict=True):
            documented[f"{section}.{key}"] = value
    return documented


def params_leaves(tree: dict, prefix: str = "", depth: int = 1) -> dict[str, Any]:
    """Every key of params.yaml: sections' keys, and each detector's params as one value."""
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and depth < 3:
            leaves.update(params_leaves(value, f"{prefix}{key}.", depth + 1))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def same(documented: str, value: Any) -> bool:
    parsed = yaml.safe_load(documented)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(parsed) == float(value)
        except (TypeError, ValueError):
            return False
    return parsed == value


def test_readme_params_table_matches_params_yaml():
    params = params_leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    documented = readme_params()
    assert sorted(set(params) - set(documented)) == [], "keys of params.yaml missing in README"
    assert sorted(set(documented) - set(params)) == [], "README documents keys params.yaml lacks"
    wrong = {
        key: (documented[key], params[key])
        for key in params
        if not same(documented[key], params[key])
    }
    assert wrong == {}, "README default != params.yaml value"


def test_readme_points_only_inside_the_repository():
    text = README.read_text()
    assert "../shared" not in text and "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which is not here"
    assert (ROOT / "docs" / "design.md").exists()
