"""Regenerate the offline STAND-IN data in flexgen_helm/helm/data/standins/ (deterministic).

The stand-ins are self-made, synthetic examples in the exact file formats HELM 0.5.16 reads for
MMLU, WikiFact and XSUM. They exist so the pipeline runs end to end without network; their
scores mean nothing. Real runs download the real data.

    python scenarios/make_standins.py
"""
from __future__ import annotations

import csv
import json
import math
import os
import random

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "flexgen_helm", "helm", "data", "standins")
rng = random.Random(1234)


def choices(correct: str, wrong: list[str]) -> tuple[list[str], str]:
    opts = [correct] + wrong[:3]
    rng.shuffle(opts)
    return opts, "ABCD"[opts.index(correct)]


def algebra(n: int) -> list[list[str]]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            m = rng.choice([6, 8, 9, 10, 12, 14, 15, 16, 18, 20])
            a = rng.randrange(1, m)
            ans = m // math.gcd(a, m)
            q = f"Find the order of the element {a} in the additive group Z_{m}."
        elif kind == 1:
            p = rng.choice([5, 7, 11, 13])
            a, b = rng.randrange(1, p), rng.randrange(1, p)
            ans = a * b % p
            q = f"Compute the product {a} * {b} in the field Z_{p}."
        else:
            m = rng.choice([4, 6, 8, 9, 10, 12])
            ans = sum(1 for k in range(1, m + 1) if math.gcd(k, m) == 1)
            q = f"How many generators does the cyclic group Z_{m} have?"
        wrong = [str(x) for x in rng.sample([v for v in range(0, 21) if v != ans], 3)]
        opts, letter = choices(str(ans), wrong)
        rows.append([q, *opts, letter])
    return rows


def foreign_policy(n: int) -> list[list[str]]:
    rows = []
    for _ in range(n):
        y, step, k = rng.randrange(1950, 2000), rng.choice([2, 4, 5, 10]), rng.randrange(2, 5)
        a, b = rng.sample(["Country A", "Country B", "Country C", "Country D"], 2)
        q = (f"In this fictional example, {a} and {b} signed a treaty in {y} that is renewed every {step} years. "
             f"In which year was it renewed for the {['', 'first', 'second', 'third', 'fourth'][k]} time?")
        ans = y + k * step
        opts, letter = choices(str(ans), [str(ans + d) for d in rng.sample([-step, step, 2 * step, -1, 1], 3)])
        rows.append([q, *opts, letter])
    return rows


def write_csv(path: str, rows: list[list[str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


SURNAMES = ["Smith", "Jones", "Garcia", "Miller", "Davis", "Lopez", "Wilson", "Moore", "Taylor", "Clark",
            "Lewis", "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams",
            "Nelson", "Hill", "Carter", "Mitchell", "Perez", "Roberts", "Turner", "Phillips", "Campbell", "Parker"]
KINDS = [("Paris", "city"), ("Berlin", "city"), ("Lagos", "city"), ("Lima", "city"), ("Osaka", "city"),
         ("Danube", "river"), ("Nile", "river"), ("Amazon", "river"), ("Rhine", "river"), ("Volga", "river"),
         ("Mars", "planet"), ("Venus", "planet"), ("Jupiter", "planet"), ("Saturn", "planet"),
         ("Mercury", "planet"), ("oak", "tree"), ("maple", "tree"), ("birch", "tree"), ("pine", "tree"),
         ("salmon", "fish"), ("trout", "fish"), ("tuna", "fish"), ("cod", "fish"), ("violin", "musical instrument"),
         ("cello", "musical instrument"), ("flute", "musical instrument"), ("oboe", "musical instrument"),
         ("Everest", "mountain"), ("Kilimanjaro", "mountain"), ("Denali", "mountain"), ("Pacific", "ocean"),
         ("Atlantic", "ocean"), ("Arctic", "ocean"), ("English", "language"), ("Swahili", "language"),
         ("Tagalog", "language"), ("Hindi", "language"), ("iron", "chemical element"), ("neon", "chemical element"),
         ("copper", "chemical element"), ("helium", "chemical element"), ("Sahara", "desert"), ("Gobi", "desert")]


def wikifact() -> dict[str, list[dict]]:
    plaintiff = []
    for i in range(60):
        a, b = rng.sample(SURNAMES, 2)
        plaintiff.append({"property": "P1620", "template": f"The plaintiff in {a} v. {b} is",
                          "result_names": [[a]], "standin": True})
    instance_of = [{"property": "P31", "template": f"{s} is an instance of", "result_names": [[k]], "standin": True}
                   for s, k in KINDS]
    rng.shuffle(instance_of)
    split = {"train": (10, 8), "dev": (10, 7)}
    out: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    p0 = i0 = 0
    for name, (np_, ni) in split.items():
        out[name] = plaintiff[p0:p0 + np_] + instance_of[i0:i0 + ni]
        p0, i0 = p0 + np_, i0 + ni
    out["test"] = plaintiff[p0:] + instance_of[i0:]
    return out


TOWNS = ["Elmsford", "Karrow", "Dunmere", "Ashby Vale", "Port Linden", "Marlow Cross", "Thistlebank", "Orrin"]
THINGS = ["library", "bridge", "swimming pool", "bus station", "market hall", "community hospital", "ferry pier",
          "primary school"]
CAUSES = ["storm damage", "a funding shortfall", "a long-running safety review", "flooding", "a staff shortage",
          "a fire in the basement", "rising repair costs", "a dispute over ownership"]


def article(words: tuple[int, int]) -> dict:
    town, thing, cause = rng.choice(TOWNS), rng.choice(THINGS), rng.choice(CAUSES)
    days = rng.randrange(2, 30)
    summary = f"The {thing} in the fictional town of {town} will close for {days} days because of {cause}."
    body = [f"Officials in {town} said on Monday that the town's {thing} would close for {days} days.",
            f"The decision followed {cause}, which the council described as the worst in a decade.",
            f"Residents who rely on the {thing} were told to use services in neighbouring towns.",
            f"A council spokesperson said work would begin next week and that updates would be posted online.",
            f"Local business owners said the closure would hurt trade during the busy season.",
            f"One resident said the {thing} had been part of daily life in {town} for as long as she could remember.",
            f"The council added that the total cost of the work had not yet been agreed.",
            f"Engineers will inspect the site again before it reopens to the public.",
            f"This article is a stand-in written for offline tests and describes no real event."]
    text = " ".join(body)
    while len(text.split()) < words[0]:
        text += " " + rng.choice(body)
    text = " ".join(text.split()[:words[1]])
    return {"document": text, "summary": summary}


def main() -> None:
    for subject, make in (("abstract_algebra", algebra), ("us_foreign_policy", foreign_policy)):
        for split, n in (("dev", 5), ("val", 6), ("test", 40)):
            write_csv(os.path.join(ROOT, "mmlu", "data", split, f"{subject}_{split}.csv"), make(n))
    for split, rows in wikifact().items():
        path = os.path.join(ROOT, "wikifact", "data", f"{split}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    xsum = {"train": [article((60, 140)) for _ in range(8)],
            "validation": [article((60, 120)) for _ in range(6)],
            "test": [article((50, 130)) for _ in range(40)]}
    path = os.path.join(ROOT, "summarization", "data", "xsum-sampled.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(xsum, f, indent=1)


if __name__ == "__main__":
    main()
