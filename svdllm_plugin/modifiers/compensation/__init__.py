"""LowRankCompensationModifier, registered so YAML recipes can name it."""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin.modifiers.compensation.base import LowRankCompensationModifier

__all__ = ["LowRankCompensationModifier"]
ModifierFactory.register("LowRankCompensationModifier", LowRankCompensationModifier)
