"""The model core: configuration, the network, attention backends, weights, tokenizers, image
preprocessing and scoring. Files and tensors in, tensors out; nothing here knows the command
line (no flags, exit codes, Rich or progress bars) and nothing here imports the app layer."""
