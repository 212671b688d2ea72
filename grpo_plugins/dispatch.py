"""One dispatcher per combine mode of the hook table (``single``, ``chain``, ``multiply``, ``add``,
``all``), and the checks of every output against its hook's contract.

A dispatcher receives the hook's row of :data:`grpo_plugins.hooktable.TABLE`, the implementations
to run (already in the run's configured order), a :class:`Caller` and the values that resolve the
contract's symbols (``N``, ``T``, ``B``, ``budget``, ...). Every output is checked as soon as it is
returned; a broken contract or an exception is a :class:`PluginError` naming the method and the hook.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from grpo_plugins.batch import LossTerm
from grpo_plugins.errors import PluginError
from grpo_plugins.hooktable import HOOKS, Hook
from grpo_plugins.validation import check_contract

Impl = tuple[Any, Any]
"""One implementation to run: ``(EnabledMethod, pluggy HookImpl)``."""


class Caller:
    """Calls one method's implementation of a hook with the keyword arguments it accepts.

    An exception the method raises becomes a :class:`PluginError` naming the method, the hook and
    the distribution; with ``trace`` every call is printed to stderr with its output and duration.
    """

    def __init__(self, trace: bool = False):
        self.trace = trace

    def __call__(self, hook: str, entry: Any, impl: Any, kwargs: Mapping[str, Any]) -> Any:
        args = {name: kwargs[name] for name in impl.argnames}
        start = time.perf_counter() if self.trace else 0.0
        try:
            output = impl.function(**args)
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(entry.name, hook, entry.distribution, f"raised {type(error).__name__}: {error}") from error
        if self.trace:
            elapsed = (time.perf_counter() - start) * 1e3
            print(
                f"[grpo_plugins] {hook} <- {entry.name} ({entry.distribution}): {summary(output)} in {elapsed:.2f} ms",
                file=sys.stderr,
            )
        return output


def checked(hook: Hook, entry: Any, output: Any, values: Mapping[str, Any]) -> Any:
    """``output`` if it meets ``hook``'s contract; otherwise a :class:`PluginError`."""
    problem = contract_problem(hook, output, values)
    if problem:
        raise PluginError(entry.name, hook.name, entry.distribution, problem)
    return output


def contract_problem(hook: Hook, output: Any, values: Mapping[str, Any]) -> str | None:
    """What is wrong with one method's ``output`` of ``hook``, or None."""
    contract = hook.output
    if contract.kind == "none":
        return None
    if contract.kind == "tensor":
        return check_contract(output, contract, values)
    if contract.kind == "prompts":
        count = values["P"]
        if not isinstance(output, list) or len(output) != count:
            length = len(output) if hasattr(output, "__len__") else "?"
            return f"must return a list of {count} prompts, got {type(output).__name__} of length {length}"
        return None
    if contract.kind == "rows":
        if not isinstance(output, list):
            return f"must return a list of row dicts, got {type(output).__name__}"
        for i, row in enumerate(output):
            if not isinstance(row, Mapping) or not {"prompt_id", "completion"} <= set(row):
                return f"row {i} must be a dict with 'prompt_id' and 'completion', got {row!r:.80}"
        return None
    item = "LossTerm" if contract.kind == "objectives" else "(B, T) tensor"
    if not isinstance(output, Mapping):
        return f"must return a dict of {item}s, got {type(output).__name__}"
    for key, value in output.items():
        if contract.kind == "objectives":
            if not isinstance(value, LossTerm):
                return f"term '{key}': must be a grpo_plugins.LossTerm, got {type(value).__name__}"
            value = value.values
        problem = check_contract(value, contract, values)
        if problem:
            return f"term '{key}': {problem}"
    return None


# ----------------------------------------------------------------------------- dispatchers
def run_single(hook: Hook, impls: Sequence[Impl], call: Caller, values: Mapping, **kwargs: Any) -> Any:
    """The provider's checked output, or None when no enabled method provides the hook."""
    for entry, impl in impls:
        return checked(hook, entry, call(hook.name, entry, impl, kwargs), values)
    return None


def run_chain(
    hook: Hook, impls: Sequence[Impl], call: Caller, values: Mapping, store: Callable | None = None, **kwargs: Any
) -> Any:
    """Each implementation receives the previous output as ``kwargs[hook.chained]``; the last output
    (the chained argument itself when no method implements the hook). ``store(output)`` runs after
    each method, so the next one also sees the value where it lives (e.g. ``batch.rewards``)."""
    for entry, impl in impls:
        kwargs[hook.chained] = checked(hook, entry, call(hook.name, entry, impl, kwargs), values)
        if store is not None:
            store(kwargs[hook.chained])
    return kwargs[hook.chained]


def run_multiply(
    hook: Hook,
    impls: Sequence[Impl],
    call: Caller,
    values: Mapping,
    initial: Any = None,
    store: Callable | None = None,
    **kwargs: Any,
) -> Any:
    """``initial`` (or the first output) multiplied by every output in order; ``initial`` (None by
    default) when no method implements the hook. ``store(product)`` runs after each method."""
    product = initial
    for entry, impl in impls:
        output = checked(hook, entry, call(hook.name, entry, impl, kwargs), values)
        product = output if product is None else product * output
        if store is not None:
            store(product)
    return product


def run_add(hook: Hook, impls: Sequence[Impl], call: Caller, values: Mapping, **kwargs: Any) -> Any:
    """Dict outputs merged as ``{"<method>/<name>": value}`` (terms stay separate, in order); list
    outputs concatenated. Empty when no method implements the hook."""
    merged: dict[str, Any] | list[Any] = [] if hook.output.kind == "rows" else {}
    for entry, impl in impls:
        output = checked(hook, entry, call(hook.name, entry, impl, kwargs), values)
        if isinstance(merged, list):
            merged.extend(output)
        else:
            merged.update({f"{entry.name}/{key}": value for key, value in output.items()})
    return merged


def run_all(hook: Hook, impls: Sequence[Impl], call: Caller, values: Mapping, **kwargs: Any) -> None:
    """Every implementation, in order, for its side effects."""
    for entry, impl in impls:
        checked(hook, entry, call(hook.name, entry, impl, kwargs), values)


DISPATCHERS: Mapping[str, Callable[..., Any]] = {
    "single": run_single,
    "chain": run_chain,
    "multiply": run_multiply,
    "add": run_add,
    "all": run_all,
}


def dispatch(name: str, impls: Sequence[Impl], call: Caller, values: Mapping | None = None, **kwargs: Any) -> Any:
    """Run hook ``name`` with the dispatcher of its combine mode."""
    hook = HOOKS[name]
    return DISPATCHERS[hook.combine](hook, impls, call, values or {}, **kwargs)


def summary(output: Any) -> str:
    """A short description of a hook's output for the trace."""
    if isinstance(output, torch.Tensor):
        return f"tensor {tuple(output.shape)} {str(output.dtype).replace('torch.', '')}"
    if isinstance(output, Mapping):
        return "{" + ", ".join(f"{k}: {summary(v)}" for k, v in output.items()) + "}"
    if isinstance(output, list):
        return f"list of {len(output)}"
    return type(output).__name__
