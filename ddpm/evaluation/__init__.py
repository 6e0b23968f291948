"""Sample quality: the metrics and their feature nets (FID/KID with Inception, the offline FD-digitsnet), scoring
one model, a run's scores.jsonl, sampling sweeps and their results, and the HTML report that compares runs.

Uses data/ (reference images), models/ and sampling/; used by training (in-training evaluation) and publishing."""
