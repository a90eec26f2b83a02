"""Pure E3RL math: tensors in, tensors out. No Ray or DeepSpeed imports here (a test checks)."""
