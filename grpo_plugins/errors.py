"""Errors raised by the core. Every message names the method, the hook and the distribution involved."""


class GRPOPluginsError(Exception):
    """Base class of every error raised by grpo-plugins."""


class CompositionError(GRPOPluginsError):
    """The run's list of methods cannot be composed; raised at start-up, before any training."""


class ConfigError(CompositionError):
    """A method's configuration has an unknown key or a value of the wrong type."""


class BatchError(GRPOPluginsError):
    """The batch an adapter built is malformed (shapes, non-finite rewards, empty groups, ...)."""


class PluginError(GRPOPluginsError):
    """A method's hook raised, or returned an output that breaks the hook's contract."""

    def __init__(self, method: str, hook: str, distribution: str, message: str):
        self.method, self.hook, self.distribution, self.message = method, hook, distribution, message
        super().__init__(f"method '{method}' (distribution {distribution}), hook '{hook}': {message}")

    def __reduce__(self):  # picklable, so it crosses process boundaries (Ray workers, spawn) intact
        return type(self), (self.method, self.hook, self.distribution, self.message)
