"""Training-time quality checks of the shapes models on held-out seeds.

Small, self-contained re-implementations for monitoring training: greedy generation through the
shipped processor, POPE answers parsed with LLaVA's rule (first sentence; "no" if any word is
"No", "not" or "no"; else "yes"), MME's official first-four-characters rule, CHAIR with the
shapes synonym table (exact-word matching plus plural handling, not NLTK), and multiple-choice
letter matching. The official eval suite (`vlmkit.eval`) re-measures on the written benchmarks.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import torch

from vlmkit.data.shapes import EVAL_SEEDS, SYNONYMS, WorldConfig, render
from vlmkit.data.shapes_bench import MME_SUBTASKS, POPE_SPLITS, _mme_pair, _qualifying, pope_questions
from vlmkit.data.shapes_text import CHAIR_PROMPT, MME_SUFFIX, plural
from vlmkit.data.shapes_video import MC_ANSWER_PREFIX, clip_question, mc_prompt, render_clip, sample_clip
from vlmkit.eval.benchmarks.video import parse_choice

MONITOR_SEED = EVAL_SEEDS.start + 900_000_000
"""First held-out seed of training-time checks (far from the benchmarks' default seeds)."""


def pope_parse(text: str) -> str:
    """LLaVA's `eval_pope.py` rule: "yes" or "no"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_parse(text: str) -> str:
    """The official MME tool's rule on the lowercased response: "yes", "no" or "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else ("no" if "no" in head else "other")


@torch.no_grad()
def generate(model, processor, images: list, questions: list[str], max_new_tokens: int = 4,
             batch_size: int = 32, video: bool = False, answer_prefix: str = "") -> list[str]:
    """Greedy answers to one question per image (or per video: frames `[T, H, W, 3]`), each reply
    after `answer_prefix` pre-filled in the assistant's turn."""
    model.eval()
    answers: list[str] = []
    kind = "video" if video else "image"
    for start in range(0, len(questions), batch_size):
        chunk_q = questions[start:start + batch_size]
        chunk_v = images[start:start + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": q}]}],
            add_generation_prompt=True) + answer_prefix for q in chunk_q]
        media = {"videos": list(chunk_v)} if video else {"images": list(chunk_v)}
        inputs = processor(text=texts, padding=True, return_tensors="pt", **media).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def pope_scenes(n_images: int, seed: int, config: WorldConfig) -> list:
    """The first `n_images` held-out scenes from `seed` with at least 3 categories (POPE asks about 3)."""
    return list(_qualifying(seed, n_images, lambda s: len(s.categories()) >= 3, config))


def pope_eval(model, processor, n_images: int = 100, seed: int = MONITOR_SEED,
              config: WorldConfig | None = None, splits: tuple[str, ...] = POPE_SPLITS,
              batch_size: int = 32) -> dict:
    """POPE accuracy (and yes-ratio, F1) per split over `n_images` held-out images.

    Returns:
        `{split: {"accuracy", "f1", "yes_ratio", "questions"}}`.
    """
    config = config or WorldConfig()
    scenes = pope_scenes(n_images, seed, config)
    names = [str(s.seed) for s in scenes]
    images = {str(s.seed): render(s) for s in scenes}
    rows = {split: pope_questions([s.categories() for s in scenes], names, split, seed)
            for split in splits}
    unique = sorted({(r["image"], r["text"]) for split_rows in rows.values() for r in split_rows})
    answers = generate(model, processor, [images[i] for i, _ in unique], [t for _, t in unique],
                       batch_size=batch_size)
    parsed = {key: pope_parse(a) for key, a in zip(unique, answers)}
    result = {}
    for split, split_rows in rows.items():
        pred = [parsed[(r["image"], r["text"])] for r in split_rows]
        gold = [r["label"] for r in split_rows]
        tp = sum(p == g == "yes" for p, g in zip(pred, gold))
        fp = sum(p == "yes" != g for p, g in zip(pred, gold))
        fn = sum(p == "no" != g for p, g in zip(pred, gold))
        acc = sum(p == g for p, g in zip(pred, gold)) / len(gold)
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        result[split] = {"accuracy": round(acc, 4), "f1": round(f1, 4),
                         "yes_ratio": round(pred.count("yes") / len(pred), 4), "questions": len(gold)}
    return result


_OBJECT_WORDS = {word: category for category, words in SYNONYMS.items() for word in words}
_OBJECT_WORDS |= {plural(word): category for word, category in list(_OBJECT_WORDS.items())}


def caption_objects(text: str) -> list[str]:
    """Categories mentioned in a caption (repeats kept), by synonym and plural lookup."""
    return [_OBJECT_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _OBJECT_WORDS]


def chair_eval(model, processor, n_images: int = 100, seed: int = MONITOR_SEED,
               config: WorldConfig | None = None, max_new_tokens: int = 64,
               batch_size: int = 32) -> dict:
    """CHAIR_i, CHAIR_s and recall of `CHAIR_PROMPT` captions (last incomplete sentence dropped).

    Returns:
        `{"chair_i", "chair_s", "recall", "mean_words", "captions", "examples"}`.
    """
    config = config or WorldConfig()
    scenes = list(_qualifying(seed, n_images, lambda s: bool(s.objects), config))
    captions = generate(model, processor, [render(s) for s in scenes], [CHAIR_PROMPT] * len(scenes),
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    mentions = hallucinated = bad_captions = covered = total_gt = words = 0
    for scene, text in zip(scenes, captions):
        if "." in text:
            text = text[: text.rfind(".") + 1]
        found = caption_objects(text)
        truth = set(scene.categories())
        wrong = [c for c in found if c not in truth]
        mentions += len(found)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        covered += len(truth & set(found))
        total_gt += len(truth)
        words += len(text.split())
    return {"chair_i": round(hallucinated / max(mentions, 1), 4),
            "chair_s": round(bad_captions / len(scenes), 4),
            "recall": round(covered / max(total_gt, 1), 4),
            "mean_words": round(words / len(scenes), 2), "captions": len(scenes),
            "examples": captions[:3]}


def mme_eval(model, processor, n_images: int = 30, seed: int = MONITOR_SEED,
             config: WorldConfig | None = None, batch_size: int = 32,
             subtasks: tuple[str, ...] = MME_SUBTASKS) -> dict:
    """Accuracy, acc+ and score (acc*100 + acc+*100) per MME-style subtask."""
    config = config or WorldConfig()
    result = {}
    for k, subtask in enumerate(MME_SUBTASKS):
        if subtask not in subtasks:
            continue
        pairs = {}

        def keep(scene, subtask=subtask) -> bool:
            pair = _mme_pair(scene, subtask, np.random.default_rng([scene.seed, 3]))
            pairs[scene.seed] = pair
            return pair is not None

        scenes = list(_qualifying(seed + k * 1_000_000, n_images,
                                  lambda s: bool(s.objects) and keep(s), config))
        questions = [q + MME_SUFFIX for s in scenes for q in pairs[s.seed]]
        images = [render(s) for s in scenes for _ in range(2)]
        answers = [mme_parse(a) for a in generate(model, processor, images, questions,
                                                   batch_size=batch_size)]
        gold = ["yes", "no"] * len(scenes)
        correct = [a == g for a, g in zip(answers, gold)]
        acc = sum(correct) / len(correct)
        acc_plus = sum(correct[i] and correct[i + 1] for i in range(0, len(correct), 2)) / len(scenes)
        result[subtask] = {"accuracy": round(acc, 4), "acc_plus": round(acc_plus, 4),
                           "score": round(100 * (acc + acc_plus), 2)}
    return result


def mc_parse(reply: str, candidates: list[str]) -> str | None:
    """The chosen candidate of a reply to MVBench's pre-filled "Best option:(": the letter as MVBench's
    parser reads it (`vlmkit.eval.benchmarks.video`), else the first candidate whose text the reply names."""
    letter = parse_choice(reply, candidates, "mvbench")
    if letter is not None:
        return candidates["ABCD".index(letter)]
    hits = [c for c in candidates if c in reply]
    return hits[0] if hits else None


def video_eval(model, processor, n_clips: int = 100, seed: int = MONITOR_SEED,
               config: WorldConfig | None = None, num_frames: int = 8, batch_size: int = 16) -> dict:
    """Multiple-choice accuracy over held-out clips, overall and per task (chance 0.25), with MVBench's
    protocol: "Best option:(" pre-filled, the letter read by MVBench's parser. `content_accuracy`
    also takes a reply that names the right option's text without its letter (`mc_parse`)."""
    config = config or WorldConfig(max_objects=3)
    items, videos = [], []
    for s in range(seed, seed + n_clips):
        clip = sample_clip(s, config, num_frames)
        items.append(clip_question(clip, np.random.default_rng([s, 4])))
        videos.append(render_clip(clip))
    answers = generate(model, processor, videos,
                       [mc_prompt(i["question"], i["candidates"]) for i in items],
                       max_new_tokens=6, batch_size=batch_size, video=True, answer_prefix=MC_ANSWER_PREFIX)
    per_task, content = defaultdict(list), []
    for item, answer in zip(items, answers):
        letter = parse_choice(answer, item["candidates"], "mvbench")
        per_task[item["task"]].append(letter == "ABCD"[item["candidates"].index(item["answer"])])
        content.append(mc_parse(answer, item["candidates"]) == item["answer"])
    every = [c for v in per_task.values() for c in v]
    return {"accuracy": round(sum(every) / len(every), 4), "content_accuracy": round(sum(content) / len(content), 4),
            **{task: round(sum(v) / len(v), 4) for task, v in sorted(per_task.items())}}

