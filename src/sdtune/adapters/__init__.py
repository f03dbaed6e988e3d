"""Layer 1: trainable additions to a frozen model: new-token embeddings, LoRA family (peft), hypernetworks."""
