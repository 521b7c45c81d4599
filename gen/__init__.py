"""llmgen: generate readable, standalone GPT-2 training programs from a model spec."""

__version__ = "0.1.0"
