"""OxygenREC fast path: semantic IDs, the instruction-following encoder-decoder, IGR, Q2I,
trie-constrained beam search, and the pre-training stage (see ``README.md``)."""
