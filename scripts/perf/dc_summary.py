"""Summary of data-constrained benchmark runs (scripts/perf/data-constrained): for each JSON-lines
log of `charlm-trainer train` (or of nanochat_ttb.py), the best val bpc, the step, epoch and share
of the run where it was reached, the val bpc at the end, the median tokens/s, and for early-stop
patience P = 1, 2, 3, 5 the evaluation the run would have stopped at and the share of the run it
would have saved (the delivered model is the best so far then, which is the best of the run when
the stop comes after it). "P2": every evaluation without a better val bpc counts; "G2" (the
trainer's rule): only those where the training split's bpc is at least MARGIN (default 0.005, the
trainer's MEMORISING_MARGIN; environment variable MARGIN) below the validation split's.

    python3 dc_summary.py LOG.jsonl...          # one table row per log
    python3 dc_summary.py --train-seconds LOG   # the training seconds of one charlm log
"""
import json
import os
import statistics
import sys

PATIENCES = (1, 2, 3, 5)
MARGIN = float(os.environ.get("MARGIN", "0.005"))


def read(path):
    evals, tps, end, epoch_per_step, wall = [], [], None, None, None
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "eval":
            evals.append((e["step"], e["val_bpc"], e.get("train_bpc")))
        elif e.get("event") == "step":
            if e.get("tokens_per_s"):
                tps.append(e["tokens_per_s"])
            if e.get("step"):
                epoch_per_step = e["epoch"] / e["step"]
        elif e.get("event") == "end":
            end = e["progress"]
        elif "impl" in e and "val_bpc" in e and not e.get("final"):
            evals.append((e["step"], e["val_bpc"], None))
        elif e.get("final"):
            end = {"step": e["steps"], "elapsed_s": e["train_s"]}
            tps.append(e["tokens_per_s"])
    if end is not None:
        wall = end.get("elapsed_s")
    return evals, tps, end, epoch_per_step, wall


def stop_at(evals, patience, gated=False):
    """Index of the evaluation where early stopping with `patience` stops (None: never)."""
    best, since = None, 0
    for i, (_, bpc, train) in enumerate(evals):
        if best is None or bpc < best:
            best, since = bpc, 0
        elif not gated or (train is not None and train < bpc * (1 - MARGIN)):
            since += 1
            if since >= patience:
                return i
    return None


def row(path):
    evals, tps, end, eps, wall = read(path)
    name = os.path.basename(path).removesuffix(".jsonl")
    if not evals:
        return f"{name}: no evaluations ({'ended' if end else 'unfinished'})"
    last_step = evals[-1][0]
    bi = min(range(len(evals)), key=lambda i: evals[i][1])
    bstep, bbpc, _ = evals[bi]
    ep = f"{bstep * eps:.1f}" if eps else "?"
    stops = []
    gated = [(p, True) for p in PATIENCES] if any(e[2] is not None for e in evals) else []
    for p, g in [(p, False) for p in PATIENCES] + gated:
        label = f"{'G' if g else 'P'}{p}"
        i = stop_at(evals, p, g)
        if i is None:
            stops.append(f"{label}: never")
            continue
        got = min(e[1] for e in evals[: i + 1])
        after = i - bi if i > bi else "-"
        stops.append(f"{label}: step {evals[i][0]} ({100 * (1 - evals[i][0] / last_step):.0f}% "
                     f"saved, {got:.4f}{'' if got == bbpc else ' > best'}, {after} evals after best)")
    tok = f"{statistics.median(tps):,.0f}" if tps else "?"
    return (f"{name}: best {bbpc:.4f} at step {bstep}/{last_step} (epoch {ep}, "
            f"{100 * bstep / last_step:.0f}% of the run) | end {evals[-1][1]:.4f} | "
            f"{tok} tok/s | {wall if wall is not None else '?'} s | " + "; ".join(stops))


def main(argv):
    if argv[:1] == ["--train-seconds"]:
        _, _, end, _, wall = read(argv[1])
        print(round(wall or 60.0, 1))
        return
    for path in argv:
        print(row(path))


if __name__ == "__main__":
    main(sys.argv[1:])
