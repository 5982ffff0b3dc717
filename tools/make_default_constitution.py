#!/usr/bin/env python3
"""Write the default constitution's exemplar files from the labelled development set.

Every item of shared/bench/dev.jsonl becomes an exemplar: violations go to the file of the
rule for their category, `ok` items to the shared compliant pool. Each line keeps its
origin as `"source": "dev:<id>"` (the datasets behind the ids, and their licences, are in
NOTICE); `charter bench` uses that id to keep an item's own group out of the exemplars
it is scored against (grouped cross-validation).

The `neutrality` rule has no items in dev.jsonl; its exemplars come from the team's own
labelled set bench/neutrality.jsonl (violations are the rule's violating exemplars, ok items
its own compliant ones), with `"source": "item:<id>"`, which bench treats as `dev:`.

usage: python3 tools/make_default_constitution.py [--dev ../shared/bench/dev.jsonl]
                                                  [--neutrality bench/neutrality.jsonl]
"""
import argparse
import json
import os

RULE_OF_CATEGORY = {
    "harm": "harmful-content",
    "privacy": "privacy",
    "hate": "hate-harassment",
    "self_harm": "self-harm",
    "sexual": "sexual-content",
    "illegal": "illegal-activity",
    "misinformation": "misinformation",
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", default=os.path.join(root, "..", "shared", "bench", "dev.jsonl"))
    ap.add_argument("--neutrality", default=os.path.join(root, "bench", "neutrality.jsonl"))
    ap.add_argument("--out", default=os.path.join(root, "constitution", "default"))
    args = ap.parse_args()

    files = {rule: [] for rule in RULE_OF_CATEGORY.values()}
    files["compliant"] = []
    with open(args.dev, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            entry = {"text": item["text"], "lang": item["lang"], "source": f"dev:{item['id']}"}
            if item["label"] == "ok":
                files["compliant"].append(dict(entry, label="compliant"))
            else:
                files[RULE_OF_CATEGORY[item["category"]]].append(dict(entry, label="violating"))
    files["neutrality"] = []
    with open(args.neutrality, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            label = "violating" if item["label"] == "violation" else "compliant"
            files["neutrality"].append({"text": item["text"], "label": label,
                                        "lang": item["lang"], "source": f"item:{item['id']}"})
    os.makedirs(args.out, exist_ok=True)
    for name, entries in files.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for e in entries:
                # Compact lines, no language (the loader ignores it) and no label in the
                # shared compliant file (its lines may
                # omit it): the folder must fit a 1 MiB Kubernetes ConfigMap.
                line = {"text": e["text"], "label": e["label"],
                        "source": e["source"]}
                if name == "compliant":
                    del line["label"]
                f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        print(f"{path}: {len(entries)} exemplars")


if __name__ == "__main__":
    main()
