"""megaphi: train Phi-4 style models with Megatron-Core through the whole recipe.

Importing megaphi has no side effects: no argument parsing, no process groups, no patches.
"""

__version__ = "0.1.0"
