"""``grpo-plugins new NAME``: write a ready-to-install method distribution.

The output is what ``examples/plugin-template/`` holds (that folder is this module's output for
``my_method``, and a test keeps the two identical): a ``pyproject.toml`` with the entry point and
the test extra, one module with the chosen hooks (their signatures and the spec's docstrings), a
frozen config with one example option, tests that run the conformance suite plus a place for the
paper's worked example, and a README page. Every hook body is a neutral placeholder that meets its
contract, so the distribution installs, is listed and passes the conformance suite before a line of
the method is written.
"""

from __future__ import annotations

import inspect
import keyword
import re
import textwrap
from pathlib import Path
from typing import Sequence

from grpo_plugins import hookspecs
from grpo_plugins.api import PLUGIN_API, parse_version

DEFAULT_HOOKS = ("shape_rewards",)
"""The hooks ``grpo-plugins new`` writes when none are chosen (``examples/plugin-template`` holds them)."""
TEMPLATE_NAME = "my_method"
"""The name ``examples/plugin-template`` is written for."""

BODIES = {
    "sample_prompts": "return torch.randperm(round.dataset_size, generator=generator)[: round.num_prompts]",
    "allocate_rollouts": (
        "counts = torch.full_like(prompt_ids, round.budget // len(prompt_ids))\n"
        "counts[: round.budget % len(prompt_ids)] += 1\n"
        "return counts"
    ),
    "augment_prompts": "return list(prompts)",
    "shape_rewards": "return rewards * self.config.weight",
    "compute_advantages": (
        'batch.require_group_size(2, "{name} (group-relative advantages)")\n'
        "return self.config.weight * group_normalize(batch.rewards, batch.group_index, batch.num_groups)"
    ),
    "adjust_advantages": "return advantages * self.config.weight",
    "mask_tokens": "return torch.ones_like(batch.token_mask)",
    "policy_surrogate": (
        "ratio = inputs.ratio\n"
        "clipped = ratio.clamp(1 - inputs.clip_low, 1 + inputs.clip_high)\n"
        "return -torch.minimum(ratio * inputs.advantages, clipped * inputs.advantages)"
    ),
    "gate_loss": "return torch.ones_like(inputs.log_probs).detach()",
    "loss_terms": 'return {"placeholder": torch.zeros_like(inputs.log_probs)}',
    "observe": 'self.log_metric("mean_reward", batch.rewards.mean())',
}
"""A neutral body per hook the adapters run (the weight option is 1: nothing changes)."""

def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a lower-case Python identifier (``my_method``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ValueError(f"method name must be a lower-case Python identifier such as 'my_method', got {name!r}")


def check_hooks(hooks: Sequence[str]) -> list[str]:
    """The hooks in hook-table order; an unknown or designed-only hook is a ``ValueError``."""
    unknown = [h for h in hooks if h not in hookspecs.HOOK_NAMES]
    if unknown:
        raise ValueError(f"unknown hook(s) {unknown}; hooks: {', '.join(hookspecs.PROVIDED_HOOKS)}")
    designed = [h for h in hooks if h not in BODIES]
    if designed:
        raise ValueError(f"hook(s) {designed} are designed but not yet run by the adapters (docs/design.md)")
    if not hooks:
        raise ValueError("choose at least one hook")
    return [h for h in hookspecs.HOOK_NAMES if h in hooks]


def render(name: str, hooks: Sequence[str]) -> dict[str, str]:
    """The distribution's files, ``{relative path: text}``."""
    check_name(name)
    hooks = check_hooks(hooks)
    dashed, title, cls = name.replace("_", "-"), name.replace("_", " ").upper(), "".join(p.title() for p in name.split("_"))
    major, _ = parse_version(PLUGIN_API)
    return {
        "pyproject.toml": PYPROJECT.format(dashed=dashed, name=name, cls=cls, title=title),
        f"grpo_plugin_{name}.py": module_text(name, title, cls, hooks, f">={PLUGIN_API},<{major + 1}"),
        f"tests/test_{name}.py": tests_text(name, title, hooks),
        "README.md": README.format(dashed=dashed, name=name, title=title, hooks=", ".join(f"`{h}`" for h in hooks)),
    }


def write_distribution(name: str, directory: str | Path = ".", hooks: Sequence[str] = DEFAULT_HOOKS) -> Path:
    """Write ``grpo-plugin-<name>/`` under ``directory`` and return its path.

    Raises:
        FileExistsError: the folder exists.
        ValueError: a bad name or hook.
    """
    files = render(name, hooks)
    folder = Path(directory) / f"grpo-plugin-{name.replace('_', '-')}"
    if folder.exists():
        raise FileExistsError(f"{folder} exists; choose another directory or remove it")
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def hook_text(name: str, hook: str) -> str:
    """One ``@hookimpl`` method: the spec's signature and docstring (its summary and Returns), a neutral body."""
    spec = getattr(hookspecs, hook)
    signature = str(inspect.signature(spec)).replace(" -> None", "").replace("'", "")
    params = signature[1:].split(")", 1)
    signature = "(self" + (", " + params[0] if params[0] else "") + ")" + params[1]
    doc = inspect.getdoc(spec) or ""
    summary = doc.split("\n\n")[0]
    returns = textwrap.indent(textwrap.dedent(doc.split("Returns:", 1)[1]).strip("\n"), "    ") if "Returns:" in doc else ""
    text = f'{summary}\n\nReturns:\n{returns}\n\nReplace the placeholder body with the method; the spec: docs/hooks.md.'
    body = BODIES[hook].replace("{name}", name)
    return (
        f"    @hookimpl\n    def {hook}{signature}:\n"
        + textwrap.indent(f'"""{text}\n"""', " " * 8) + "\n"
        + textwrap.indent(body, " " * 8) + "\n"
    )


def module_text(name: str, title: str, cls: str, hooks: Sequence[str], api_range: str) -> str:
    imports = {"GRPOBatch", "LossInputs", "PromptRound"} & {
        word for hook in hooks for word in re.findall(r"\w+", str(inspect.signature(getattr(hookspecs, hook))))
    }
    order = lambda word: (0 if word.isupper() else 1 if word[0].isupper() else 2, word)  # noqa: E731 - isort's order
    names = ", ".join(sorted({"Example", "Method", "NON_NEGATIVE", "hookimpl", "option", *imports}, key=order))
    ops = "from grpo_plugins.ops import group_normalize\n" if "compute_advantages" in hooks else ""
    typing = "from typing import Any\n" if "augment_prompts" in hooks else ""
    methods = "\n".join(hook_text(name, hook) for hook in hooks)
    return MODULE.format(name=name, title=title, cls=cls, names=names, ops=ops, typing=typing, methods=methods,
                         hooks=", ".join(hooks), api_range=api_range)


def tests_text(name: str, title: str, hooks: Sequence[str]) -> str:
    advantage_stage = {"shape_rewards", "compute_advantages", "adjust_advantages", "mask_tokens"} & set(hooks)
    worked = (WORKED if advantage_stage else WORKED_PLACEHOLDER).format(name=name)
    return TESTS.format(name=name, title=title, worked=worked)


PYPROJECT = '''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "grpo-plugin-{dashed}"
version = "0.1.0"
description = "{title} as a grpo-plugins method for TRL and verl."
readme = "README.md"
requires-python = ">=3.10"
license = "Apache-2.0"
dependencies = ["grpo-plugins"]

[project.optional-dependencies]
test = ["pytest"]

# The entry point is what makes the method discoverable: `<name runs enable> = "<module>:<Method class>"`.
[project.entry-points.grpo_plugins]
{name} = "grpo_plugin_{name}:{cls}"

[tool.setuptools]
py-modules = ["grpo_plugin_{name}"]
'''

MODULE = '''"""{title} (Author et al., year, arXiv:XXXX.XXXXX): one line on what it changes in GRPO.

The maths first, as pure tensor functions with their shapes and the paper's formula; the config; then
the thin Method class. As written by `grpo-plugins new`, every hook ({hooks}) is a neutral
placeholder that meets its contract (with ``weight = 1`` nothing changes): replace them with the method.

Shapes: ``N`` completions, ``T`` completion tokens, ``B`` rows of a loss micro-batch, ``P`` prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
{typing}
import torch

from grpo_plugins import {names}
{ops}

@dataclass(frozen=True)
class {cls}Config:
    """Options of {title}; every field says what it does, the paper's value and its domain."""

    weight: float = option(1.0, "An example option: the weight of the method's effect.", paper=1.0, domain=NON_NEGATIVE)


class {cls}(Method):
    """{title}: one line on what it does (the help `grpo-plugins list` shows)."""

    name = "{name}"
    Config = {cls}Config
    paper = "https://arxiv.org/abs/XXXX.XXXXX"
    plugin_api = "{api_range}"

    @classmethod
    def example(cls) -> Example:
        """The data the conformance suite exercises the method with: declare named reward components,
        dataset columns, completion texts, the smallest group it accepts (see grpo_plugins.example)."""
        return Example()

{methods}'''

TESTS = '''"""{title}: the conformance suite, and the paper's worked example.

Install the distribution first (`pip install -e .[test]`): the tests enable the method by name, as a
run does. `grpo-plugins test {name}` runs the conformance suite alone.
"""

import torch

from grpo_plugins.conformance import MethodConformance
from grpo_plugins.testing import make_batch


class TestConformance(MethodConformance):
    """Every guarantee of grpo-plugins: hook contracts, constant groups, padding, row order, state,
    data-parallel ranks, config domains, declared needs."""

    method = "{name}"

{worked}'''

WORKED = '''def test_worked_example(enable_methods):
    """Replace with the paper's worked example: numbers computed by hand, never by the code."""
    # two groups of two, contiguous: rewards (0, 1) and (1, 3)
    batch = make_batch(group_sizes=(2, 2), rewards=[0.0, 1.0, 1.0, 3.0], shuffle=False)
    enable_methods([{{"{name}": {{"weight": 1.0}}}}]).run_advantage_stage(batch)
    # the placeholder hooks with weight 1 leave GRPO's advantages: (r - group mean) / group std (unbiased),
    # (0 - 0.5) / 0.7071 = -0.7071 and (1 - 2) / 1.4142 = -0.7071
    expected = torch.tensor([-0.707107, 0.707107, -0.707107, 0.707107])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=0)
'''

WORKED_PLACEHOLDER = '''def test_worked_example(enable_methods):
    """Replace with the paper's worked example: numbers computed by hand, never by the code."""
    composition = enable_methods(["{name}"])
    assert composition.user_methods[0].name == "{name}"
'''

README = '''# grpo-plugin-{dashed}

{title}: one paragraph on what the method changes in GRPO and when to use it (paper: a link).

```bash
pip install -e .[test]
pytest -q tests/            # the conformance suite and the paper's worked example
grpo-plugins list           # {name}, its distribution, plugin-API range, hooks and paper link
grpo-plugins test {name}    # the conformance suite alone
```

Enable it in a run by name, e.g. TRL: `PluginGRPOTrainer(..., plugins=["{name}"])`.

Hooks: {hooks} (reference: `docs/hooks.md` of grpo-plugins).

| Field | Type | Default | Paper | Domain | Help |
|---|---|---|---|---|---|
| `weight` | float | 1.0 | 1.0 | [0, inf) | An example option: the weight of the method's effect. |

Composes with: (methods it works with). Conflicts with: (methods that claim the same single-provider hook).
What the paper's public code does, and each choice made where the paper is silent: (notes).
'''
