"""kdlib's decode engine for the hf rollout backend: generate's preparation, a lean loop of its own,
optionally compiled with frozen weights; version-gated (:mod:`.gate`)."""
