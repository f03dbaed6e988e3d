"""Layer 3b (above inference): what a model has learned, measured."""
