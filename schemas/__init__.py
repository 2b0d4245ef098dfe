"""Data contracts: the job spec, wire models and the Arrow record schema."""
