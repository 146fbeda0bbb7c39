"""Example user objectives, importable as `examples.<module>:<function>`."""
