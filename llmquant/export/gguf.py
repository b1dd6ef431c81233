"""GGUF export (being written)."""
def write_gguf(*args, **kwargs):
    raise NotImplementedError
