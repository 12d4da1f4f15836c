"""Engine: sequences, scheduler, paged KV cache, runner, sampler, tokenizer and async front."""
