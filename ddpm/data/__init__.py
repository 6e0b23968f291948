"""The training data: image sources listed once (digits, folders, the Hub), decoded into a memory-mapped uint8 cache
or streamed from WebDataset shards, staged to node-local disk, and served as resumable batches.

Imports only the top-level modules of ddpm (config, errors, files)."""
