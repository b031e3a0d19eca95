"""Training loops (SFT, policy gradient) and their update steps."""
