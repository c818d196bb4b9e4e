"""How far a converted source is from itself before any training: held-out KL and top-1 agreement
of block subsets and SubLN inits, in full precision, and each subset's training FLOPs per token
against the scratch `mini` (the figures of docs/TRAINING_GUIDE.md, "Warm start").

    python scripts/warmstart_subsets.py                    # the subsets and inits the guide lists
    python scripts/warmstart_subsets.py --layers 3 "[0,1,2,27,28,29]" --subln none median_rms

Reads the held-out traces that `eval.py` collects (`data/eval`; run `make eval` once first).
"""

from __future__ import annotations

import argparse
import ast

from bitnet_kde.data.datamodule import TraceDataset
from bitnet_kde.eval.evaluate import token_metrics
from bitnet_kde.kd.traces import read_traces
from bitnet_kde.model import BitNetConfig
from bitnet_kde.model.sizing import measure_flops_per_token
from bitnet_kde.training.warmstart import from_pretrained

SEQ_LEN = 512
GUIDE_LAYERS = ["null", "[0,1,2,6,10,14,18,22,27,28,29]", "[0,1,2,3,4,25,26,27,28,29]", "3",
                "[2,5,8,11,14,17,20,23,26,29]", "[0,1,2,3,4,5,6,7,8,9]", "2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="teacher")
    p.add_argument("--traces", default="data/eval")
    p.add_argument("--layers", nargs="*", default=GUIDE_LAYERS, help="null, a stride k, or a list of blocks")
    p.add_argument("--subln", nargs="*", default=["none", "one", "median_rms"], help="none | one | median_rms")
    args = p.parse_args()
    base = measure_flops_per_token(BitNetConfig.from_spec({"name": "mini", "vocab_size": 49152}), SEQ_LEN)
    ds = TraceDataset(read_traces(args.traces, vocab_size=49152), SEQ_LEN)
    print("| blocks | SubLN | KL | top-1 | training FLOPs/token vs mini |\n|---|---|---|---|---|")
    for spec in args.layers:
        layers = ast.literal_eval(spec.replace("null", "None"))
        for init in args.subln:
            kw = {"subln": False} if init == "none" else {"subln_init": init}
            model = from_pretrained(args.source, layers=layers, quantize=False, max_seq_len=SEQ_LEN, **kw).eval()
            m = token_metrics(model, ds, ["all"] * len(ds), batch_size=8)["overall"]
            flops = measure_flops_per_token(model.cfg, SEQ_LEN) / base
            print(f"| {spec} | {init} | {m['kl']:.2f} | {m['top1_agreement']:.3f} | {flops:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
