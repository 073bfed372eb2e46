"""What native backends run: the canonical weight layout and the codecs' lowering to it."""
