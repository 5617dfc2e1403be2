"""Evaluation: perplexity and bits per byte (sliding window); later text metrics, task harness, probes.

    import lmforge
    from lmforge.evaluate import perplexity
    print(perplexity(lmforge.load("smollm2"), open("book.txt").read(), max_length=1024))
"""

from lmforge.evaluate.perplexity import PerplexityResult, perplexity, sliding_nll

__all__ = ["PerplexityResult", "perplexity", "sliding_nll"]
