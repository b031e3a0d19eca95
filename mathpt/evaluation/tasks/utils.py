"""Helpers for the local perplexity task (copied next to the rendered YAML; lm-eval loads them by
``!function utils.<name>``). Mirrors lm-eval's wikitext ``process_results``: word and byte counts
are taken from the same text that is scored."""

import re


def doc_to_page(doc: dict) -> str:
    return doc["question"] + "\n" + doc["solution"]


def process_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    page = doc_to_page(doc)
    words = len(re.split(r"\s+", page))
    n_bytes = len(page.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
