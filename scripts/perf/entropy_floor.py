#!/usr/bin/env python3
"""The lowest val bpc any model can reach on data that `charlm-trainer generate` wrote.

`generate` (trainer/src/data/synthetic.rs) is a known random process: the question lines are
random, the answers are functions of their questions, and a worksheet holds 1-8 exercises. So the
ideal code length of a document is exact: -log2 P(document) under that process. This sums it over
a prepared split (`val.bin`, BOS + characters per document) the way charlm's `evaluate` counts:
bits over the characters, BOS targets not counted (so the end of a worksheet costs nothing, while
each "there is another exercise" costs -log2 P(more | exercises so far)). A model that sees whole
documents can do no better; one whose windows start mid-document does slightly worse. Hence a
lower bound on val bpc for the data-constrained benchmark (docs/performance.md).

  python3 scripts/perf/entropy_floor.py DATA_DIR [DATA_DIR ...]
"""
import math
import sys
from pathlib import Path

CHARS = "0123456789+-HBL.\n"
BOS = 17
MAX_EXERCISES = 8


def number_probs(max_digits):
    """P(value) of synthetic.rs `number`: digits uniform in 1..max, value uniform below 10^digits."""
    p = [0.0] * 10**max_digits
    for d in range(1, max_digits + 1):
        share = 1.0 / max_digits / 10**d
        for v in range(10**d):
            p[v] += share
    return p


N3, N4, N5, N8_CACHE = number_probs(3), number_probs(4), number_probs(5), {}


def p_number8(v):
    # number(8) has 10^8 values: sum its digit-count terms in closed form instead of a table.
    return sum(1.0 / 8 / 10**d for d in range(1, 9) if v < 10**d)


def p_unsigned(text, table):
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(text)
    return table[int(text)]


def p_signed4(text):
    """`signed(4)`: number(4), negated with probability 1/4 ("-0" prints as "0")."""
    if text.startswith("-"):
        return p_unsigned(text[1:], N4) / 4
    v = int(text)
    return N4[v] if v == 0 else N4[v] * 3 / 4


def p_decimal(text):
    """`decimal(number(3), places)` with places uniform in {1, 2}: the text shows both."""
    whole, frac = text.split(".")
    places = len(frac)
    if places not in (1, 2):
        raise ValueError(text)
    return 0.5 * N3[int(whole + frac)]


def p_question(q):
    """P(question line) under `exercise`; the answer line then has probability 1."""
    if q.startswith("B"):
        a, b = q[1:].split("+B")
        return 0.1 * (1 / 256) ** 2 if int(a, 2) < 256 and int(b, 2) < 256 else 0.0
    if q.startswith("H"):
        n = int(q[1:])
        return 0.1 * N5[n // 2] if n % 2 == 0 else 0.0
    if q.startswith("L"):
        return 0.1 * p_number8(int(q[1:]))
    i = q.find("+", 1) if q.find("+", 1) > 0 else q.find("-", 1)
    a, op, b = q[:i], q[i], q[i + 1 :]
    if "." in q:
        return 0.2 * p_decimal(a) * p_decimal(b) * (2 / 3 if op == "+" else 1 / 3)
    return 0.5 * p_signed4(a) * p_unsigned(b, N4) * 0.5


def document_bits(lines):
    """Ideal code length of one worksheet's characters (its lines: question, answer, ...)."""
    k = len(lines) // 2
    bits = 0.0
    for j in range(k):
        bits -= math.log2(p_question(lines[2 * j]))
        if j > 0:
            # After j exercises the worksheet goes on with probability (8 - j) / (9 - j).
            bits -= math.log2((MAX_EXERCISES - j) / (MAX_EXERCISES - j + 1))
    return bits


def floor(split):
    ids = split.read_bytes()
    bits, chars, docs = 0.0, 0, 0
    for doc in ids.split(bytes([BOS])):
        if not doc:
            continue
        text = "".join(CHARS[i] for i in doc)
        bits += document_bits(text.rstrip("\n").split("\n"))
        chars += len(doc)
        docs += 1
    return bits / chars, chars, docs


def main():
    for d in sys.argv[1:]:
        for name in ("val.bin", "train.bin"):
            bpc, chars, docs = floor(Path(d) / name)
            print(f"{d}/{name}: {docs} documents, {chars} characters: floor {bpc:.4f} bpc")


if __name__ == "__main__":
    main()
