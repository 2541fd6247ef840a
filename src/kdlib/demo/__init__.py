"""Tiny random models, tokenizers, pictures and chats, built locally in a second from real
transformers configs: the VLM quickstart's demo models (:mod:`.vlm`), and what the tests, the
benchmarks and the project's tools build (:mod:`.text`). Nothing here touches the network."""
