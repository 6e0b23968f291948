"""DDPM image models on diffusers: the library. Folders by concern (data, models, sampling, evaluation, training,
publishing) above a few top-level modules every layer uses (config, typed_config, device, environment, tracking,
files, errors); imports point one way (docs/architecture.md)."""
