"""grpo-plugins for TRL: ``PluginGRPOTrainer`` runs the enabled methods inside ``trl.GRPOTrainer``."""

from grpo_plugins_trl.trainer import PluginGRPOConfig, PluginGRPOTrainer

__all__ = ["PluginGRPOConfig", "PluginGRPOTrainer"]
