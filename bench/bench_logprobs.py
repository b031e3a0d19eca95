"""Peak CPU memory of per-token log-probs + entropy, forward and backward: naive vs chunked.

naive:   logits = h @ W.T -> fp32 log_softmax -> gather, entropy from the full softmax
chunked: mathpt.logprob_kernel.chunked_log_probs_from_hidden (what get_response_log_probs uses)

Each configuration runs in a fresh subprocess; the figure is the rise of peak RSS (ru_maxrss) over
the RSS right before the forward, so inputs, weights and the interpreter are not counted.
The chunked peak should follow chunk_size x vocab, the naive one seq_len x vocab.

    PYTHONPATH=. python bench/bench_logprobs.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 1024**2
SHAPE = Path(__file__).with_name("qwen2.5-math-1.5b-shape.yaml")  # its vocabulary is the large case


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(method: str, vocab: int, seq: int, hidden: int, chunk: int | None) -> dict:
    import torch

    from mathpt.logprob_kernel import chunked_log_probs_from_hidden

    torch.manual_seed(0)
    h = torch.randn(1, seq, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, seq))
    start = rss_now()
    t = time.perf_counter()
    if method == "naive":
        logits = torch.nn.functional.linear(h, w).float()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    else:
        out = chunked_log_probs_from_hidden(h, w, labels, chunk_size=chunk, return_token_entropy=True)
        logp, ent = out["log_probs"], out["token_entropy"]
    (logp.sum() + 0.1 * ent.sum()).backward()
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_rise_mib": (peak - start) / MiB, "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5, metavar=("METHOD", "VOCAB", "SEQ", "HIDDEN", "CHUNK"))
    from mathpt.models import load_shape

    ap.add_argument("--vocabs", default=f"32000,{load_shape(SHAPE)['vocab_size']}")
    ap.add_argument("--seqs", default="512,1024,2048")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", default="64,512", help="chunk sizes (tokens) for the chunked method")
    args = ap.parse_args()
    if args.child:
        m, v, s, d, c = args.child
        print(json.dumps(child(m, int(v), int(s), int(d), None if c == "none" else int(c))))
        return
    rows = []
    for vocab in map(int, args.vocabs.split(",")):
        for seq in map(int, args.seqs.split(",")):
            for method, chunk in [("naive", "none")] + [("chunked", c) for c in args.chunks.split(",")]:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    str(vocab),
                    str(seq),
                    str(args.hidden),
                    chunk,
                ]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                rows.append({"method": method, "chunk": chunk, "vocab": vocab, "seq": seq, **res})
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nhidden {args.hidden}, batch 1, fp32, forward + backward of log-probs and entropy")
    print("| vocab | seq_len | fp32 logits MiB | method | chunk | peak RSS rise MiB | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        logits = r["seq"] * r["vocab"] * 4 / MiB
        print(
            f"| {r['vocab']} | {r['seq']} | {logits:.0f} | {r['method']} | {r['chunk']} | "
            f"{r['peak_rise_mib']:.0f} | {r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
