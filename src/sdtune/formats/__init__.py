"""Layer 2: file formats other tools read: hashes, metadata, LoRA / embedding / hypernetwork layouts."""
