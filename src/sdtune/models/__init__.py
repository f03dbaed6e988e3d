"""Layer 1: the one place that knows model families: detection, offline loading and saving, tiny builders."""
