"""OneshotMagnitudePruningModifier: data-free magnitude pruning, registered so YAML recipes can name it."""

from llmcompressor.modifiers.factory import ModifierFactory

from svdllm_plugin.modifiers.pruning.magnitude import OneshotMagnitudePruningModifier

ModifierFactory.register("OneshotMagnitudePruningModifier", OneshotMagnitudePruningModifier)

__all__ = ["OneshotMagnitudePruningModifier"]
