"""Model implementations (Llama / Mistral / Qwen2 family) and weight loading."""
