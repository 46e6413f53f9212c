"""Generation engine: KV slots, continuous batching over mixed-expert batches, sampling, streaming."""
