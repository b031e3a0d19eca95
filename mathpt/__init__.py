"""mathpt: post-train small math LMs and tell, with confidence intervals, which algorithm helps most."""

__version__ = "0.1.0"
