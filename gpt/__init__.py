"""gpt: train and sample GPT-style language models from the command line."""

__version__ = "0.1.0"
