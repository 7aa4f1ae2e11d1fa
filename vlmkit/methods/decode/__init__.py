"""Hallucination-mitigating decoding (site `logits`): contrastive branches and layer contrast."""
