"""Training of the XDLM transformer and the VQ tokenizer."""
