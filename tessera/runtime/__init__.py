"""What every trainer shares, the decoder's and the codecs': atomic checkpoints with RNG state and run locks
(`checkpoint`), process groups and collectives under torchrun (`distributed`), progress bars and metrics
(`monitor`), run budgets and lr schedules (`schedule`), the host allocator setting of CPU training
(`host_memory`), and inductor's CPU thread count (`inductor`). Nothing here knows a model, a codec or the
evaluation: imports run one way, from the trainers down to this package (a test checks it)."""
