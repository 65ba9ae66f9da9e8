"""Speech without Ray: audio IO, features, k-means tokenizer, units, vocoder, TTS backends, text sources."""
