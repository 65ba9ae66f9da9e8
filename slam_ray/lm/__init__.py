"""The language model without Ray: building it, optimizers and schedules, DPO loss and preference data, sequence
likelihoods, text metrics."""
