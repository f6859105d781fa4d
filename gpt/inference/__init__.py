"""Using a model: generation (sampling, chat framing) and task classification."""
