"""PEFT adapters: read/validate, registry for the engine, and the offline trainer."""
