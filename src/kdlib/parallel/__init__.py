"""Data parallelism for the student: process groups, FSDP2 sharding, distributed checkpoints.

Parallelism lives beside the model, not inside it: the training step calls a module and does not
know whether that module is sharded.
"""
