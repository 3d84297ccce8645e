"""Tests of layer 3 (sedma_torch.deploy)."""
