"""Every configuration the documentation shows passes the checks of ``grpo-plugins check``.

Collected from ``README.md``, ``docs/*.md``, ``adapters/*/README.md``, ``plugins/*/README.md``,
``examples/**/README.md`` and the docstrings of the packages' and examples' Python modules:

- YAML blocks with ``grpo_plugins:`` (fenced ```` ```yaml ```` blocks; literal blocks in docstrings):
  checked as ``grpo-plugins check`` checks the file (:func:`grpo_plugins.cli.check_problems`). A TRL
  run config shown as a fragment is completed with what it leaves out (a model, a reward function, a
  dataset; ``use_cpu`` on a machine without GPU), none of which is loaded;
- Python method lists (``plugins=[...]``, ``grpo_plugins=[...]``): checked as a run config holding
  only that list;
- verl overrides (``+grpo_plugins='[...]'``): checked by the verl adapter's checks with that list at
  the top level (a command line shown in the docs is a fragment, so verl's own checks of batch sizes
  and devices are left out).

A list with placeholders (``...``, variable names) cannot be checked and is skipped, naming it.
A snippet known to fail is marked ``xfail(strict=True)`` with its file: fixing it makes the test
fail until the mark is removed.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from grpo_plugins.cli import check_problems, config_kind

ROOT = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "docs/*.md", "adapters/*/README.md", "plugins/*/README.md", "examples/**/README.md")
SOURCE_GLOBS = ("grpo_plugins/*.py", "adapters/*/grpo_plugins_*/*.py", "plugins/*/grpo_plugin_*.py", "examples/**/*.py")
PYTHON_LIST = re.compile(r"(?<![+\w])(?:grpo_)?plugins\s*=\s*\[")
VERL_OVERRIDE = re.compile(r"\+grpo_plugins=(?:'([^']*)'|\"([^\"]*)\"|(\[[^\s`]*\]))")
ELIDED_TRL = {
    "model_name_or_path": "elided/model",
    "dataset_name": "elided/train.jsonl",
    "reward_funcs": ["grpo_plugins_trl.testing.exact_answer_reward"],
}
"""What a TRL run config shown as a fragment leaves out (nothing of it is loaded by the check)."""

KNOWN_FAILING: dict[str, str] = {
    "examples/plugin-template/README.md#0:python": "names the template's own method 'my_method', which a run can "
    "enable only once the template is installed (it is not in the test environment)",
}
"""Snippets that fail today, ``{snippet id: why}``; each is ``xfail(strict=True)``."""


@dataclass
class Snippet:
    path: str  # relative to the repository root
    index: int  # the n-th snippet of its file
    line: int
    kind: str  # "yaml" | "python" | "verl"
    text: str
    value: Any = None  # the parsed config (yaml) or method list; None when it cannot be read
    unreadable: str = ""  # why the text cannot be parsed (a failure)
    placeholder: bool = False  # a list with placeholders: not checkable

    @property
    def id(self) -> str:
        return f"{self.path}#{self.index}:{self.kind}"


def balanced(text: str, start: int) -> str:
    """The bracketed expression opening at ``text[start] == '['``."""
    depth = 0
    for position in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position + 1]
    return text[start:]


def python_lists(text: str) -> list[tuple[int, str]]:
    return [(m.start(), balanced(text, m.end() - 1)) for m in PYTHON_LIST.finditer(text)]


def verl_overrides(text: str) -> list[tuple[int, str]]:
    return [(m.start(), next(g for g in m.groups() if g is not None)) for m in VERL_OVERRIDE.finditer(text)]


def yaml_blocks_of_markdown(text: str) -> list[tuple[int, str]]:
    return [(m.start(1), m.group(1)) for m in re.finditer(r"```ya?ml\n(.*?)```", text, flags=re.S)
            if re.search(r"^grpo_plugins:", m.group(1), flags=re.M)]


def yaml_blocks_of_docstring(text: str) -> list[tuple[int, str]]:
    """Literal blocks (after a line ending in ``::``) holding a ``grpo_plugins:`` line, cut at blank lines."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= len(line) - len(line.lstrip()):
                break
            body.append(following)
        for chunk in textwrap.dedent("\n".join(body)).split("\n\n"):
            if re.search(r"^grpo_plugins:", chunk, flags=re.M):
                blocks.append((text.find(chunk.strip().splitlines()[0]), chunk))
    return blocks


def docstrings(path: Path) -> list[tuple[int, str]]:
    """``(line, docstring)`` of a module and of its classes and functions."""
    tree = ast.parse(path.read_text())
    found = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return list(dict.fromkeys(found))


def read_list(kind: str, text: str) -> tuple[Any, str, bool]:
    """``(method list, why unreadable, has placeholders)`` of a Python list or a verl override value."""
    if kind == "python":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None, "", True  # names or calls: not a literal list
        return value, "", Ellipsis in value
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        return None, f"not a YAML list: {error}", False
    return value, "", isinstance(value, list) and "..." in value


def collect() -> list[Snippet]:
    snippets: list[Snippet] = []
    files = sorted({p for pattern in DOC_GLOBS for p in ROOT.glob(pattern)})
    sources = sorted({p for pattern in SOURCE_GLOBS for p in ROOT.glob(pattern) if "tests" not in p.parts})
    for path in files + sources:
        relative = str(path.relative_to(ROOT))
        if path.suffix == ".md":
            text = path.read_text()
            pieces = [(text, 0, yaml_blocks_of_markdown(text))]
        else:
            pieces = [(doc, line - 1, yaml_blocks_of_docstring(doc)) for line, doc in docstrings(path)]
        found: list[tuple[int, str, str]] = []
        for text, first_line, blocks in pieces:
            def line_of(offset: int) -> int:
                return first_line + text.count("\n", 0, max(offset, 0)) + 1

            found += [(line_of(o), "yaml", t) for o, t in blocks]
            found += [(line_of(o), "python", t) for o, t in python_lists(text)]
            found += [(line_of(o), "verl", t) for o, t in verl_overrides(text)]
        for index, (line, kind, text) in enumerate(sorted(found)):
            snippet = Snippet(relative, index, line, kind, text)
            if kind == "yaml":
                try:
                    snippet.value = yaml.safe_load(text)
                except yaml.YAMLError as error:
                    snippet.unreadable = f"not valid YAML: {error}"
            else:
                snippet.value, snippet.unreadable, snippet.placeholder = read_list(kind, text)
            snippets.append(snippet)
    return snippets


def problems_of(snippet: Snippet) -> list[str]:
    """What ``grpo-plugins check`` reports for the snippet (completed where it is a fragment)."""
    if snippet.unreadable:
        return [snippet.unreadable]
    if snippet.kind == "verl":
        checks = pytest.importorskip("grpo_plugins_verl.checks")
        return checks.check_config({"grpo_plugins": snippet.value}, verl_validation=False)[1]
    config = snippet.value if snippet.kind == "yaml" else {"grpo_plugins": snippet.value}
    if isinstance(config, dict) and config_kind(config) == "trl":
        pytest.importorskip("grpo_plugins_trl.checks")
        import torch

        elided = {k: v for k, v in ELIDED_TRL.items() if k not in config}
        if "reward_model_name_or_path" in config:
            elided.pop("reward_funcs", None)
        if "datasets" in config:
            elided.pop("dataset_name", None)
        if not torch.cuda.is_available():
            elided.update({k: v for k, v in {"use_cpu": True, "bf16": False}.items() if k not in config})
        config = {**elided, **config}
    if isinstance(config, dict) and config_kind(config) == "verl":
        checks = pytest.importorskip("grpo_plugins_verl.checks")
        return checks.check_config(config, verl_validation=False)[1]
    return check_problems(config)[2]


SNIPPETS = collect()


def params():
    for snippet in SNIPPETS:
        marks = []
        if snippet.placeholder:
            marks.append(pytest.mark.skip(reason=f"{snippet.path}:{snippet.line}: a list with placeholders: {snippet.text!r:.80}"))
        elif snippet.id in KNOWN_FAILING:
            marks.append(pytest.mark.xfail(strict=True, reason=f"{snippet.path}: {KNOWN_FAILING[snippet.id]}"))
        yield pytest.param(snippet, id=snippet.id, marks=marks)


@pytest.mark.parametrize("snippet", params())
def test_snippet_passes_check(snippet):
    problems = problems_of(snippet)
    assert not problems, f"{snippet.path}:{snippet.line}: {snippet.text!r}\n- " + "\n- ".join(problems)


def test_snippets_are_found():
    """The collection sees each kind of snippet (a change of the docs' format would silence the test)."""
    ids = {s.id for s in SNIPPETS}
    kinds = {s.kind for s in SNIPPETS}
    assert kinds == {"yaml", "python", "verl"}
    assert any(i.startswith("README.md#") for i in ids)
    assert any(i.startswith("examples/trl_command/README.md#") for i in ids)
    assert sum(s.path.startswith("plugins/") for s in SNIPPETS) >= 10
    assert not [s.id for s in SNIPPETS if s.id not in {p.id for p in SNIPPETS}]  # ids are unique by construction
    assert all(key in ids for key in KNOWN_FAILING), "a known failing snippet moved: update KNOWN_FAILING"


def test_the_example_run_config_passes_check_as_it_is():
    """``examples/trl_command/run.yaml`` is checked whole, not as a fragment."""
    pytest.importorskip("grpo_plugins_trl.checks")
    import torch

    config = yaml.safe_load((ROOT / "examples/trl_command/run.yaml").read_text())
    if torch.cuda.is_available():
        config.pop("use_cpu")
    kind, composition, problems = check_problems(config)
    assert (kind, problems) == ("trl", [])
    assert [e.name for e in composition.user_methods] == ["knapsack_rl", "ngrpo", "unlikeliness"]
