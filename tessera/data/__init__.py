"""Corpus formats: readers that turn each into documents for `tessera data pretokenize`."""
