"""Language models: our own KV-cached decoder, its caches, sampling and continuous batching.

- `model`: the network (Llama family, GPT-2) and HF weight loading;
- `load`: model folders, GGUF conversion into the cache dir, tokenizer + chat template;
- `cache`: full / int8 / window (StreamingLLM) static KV caches;
- `sampling`: greedy, temperature, top-k, top-p, repetition penalty on device;
- `batcher`: the per-model service that runs concurrent requests in one decode loop.
"""
