"""LoRA adapter lifecycle: validation, archive unpacking, the on-disk store, engine registration."""
