"""Build the two example lm-eval tasks shipped in src/turboquant/quality/lm_tasks from ../shared held-out text.

    python scripts/build_lm_tasks.py      # rewrites the JSONL files (deterministic: seed 0)

* ``tq_story_cloze`` (multiple choice): two sentences of a held-out TinyStories-style story, then the true next
  sentence among three sentences drawn from other stories (CDLA-Sharing source, see ../shared/data/README.md).
* ``tq_wiki_ppl`` (rolling log-likelihood → word/byte perplexity): held-out Wikipedia paragraphs (CC BY-SA 3.0).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "heldout"
OUT = ROOT / "src" / "turboquant" / "quality" / "lm_tasks"


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 160]


def story_cloze(n: int = 40, seed: int = 0) -> list[dict]:
    stories = [s for s in (SHARED / "tiny.txt").read_text().split("<|endoftext|>") if len(sentences(s)) >= 3]
    rng = random.Random(seed)
    pool = [(i, s) for i, story in enumerate(stories) for s in sentences(story)]
    items = []
    for i, story in enumerate(stories[:n]):
        sent = sentences(story)
        distractors = rng.sample([s for j, s in pool if j != i], 3)
        choices = distractors + [sent[2]]
        rng.shuffle(choices)
        items.append({"context": " ".join(sent[:2]), "choices": choices, "label": choices.index(sent[2])})
    return items


def wiki_docs(n: int = 20) -> list[dict]:
    paras = [p.strip() for p in (SHARED / "wiki.txt").read_text().split("\n") if 300 <= len(p.strip()) <= 1200]
    return [{"text": p} for p in paras[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


if __name__ == "__main__":
    write_jsonl(OUT / "tq_story_cloze.jsonl", story_cloze())
    write_jsonl(OUT / "tq_wiki_ppl.jsonl", wiki_docs())
    print("wrote", OUT)
