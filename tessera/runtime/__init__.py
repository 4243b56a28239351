"""What every trainer shares, the decoder's and the codecs': atomic checkpoints with RNG state and run locks
(`checkpoint`), process groups and collectives under torchrun (`distributed`), and budgets, progress bars
and metrics (`monitor`). Nothing here knows a model."""
