"""Training: parallel SFT attention and (later) the SFT and PAPO trainers."""
