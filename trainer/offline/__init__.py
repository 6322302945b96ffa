"""What the offline stages' Ray workers run: proposals, teacher labels, text embeddings, codecs, the region index."""
