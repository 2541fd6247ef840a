"""Models: loading (hub, directory, GGUF), the LM head contract, depth pruning, the shared forward."""
