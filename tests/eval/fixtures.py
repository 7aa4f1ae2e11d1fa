"""Tiny benchmark files in the official formats, written by the tests themselves.

The CHAIR and MME fixtures were also fed to the reference scripts (shikiw/OPERA ``chair.py``,
MME ``eval_tool/calculation.py``); the tests pin those scripts' outputs digit for digit.
"""

from __future__ import annotations

import json
from pathlib import Path

# Category ids as in COCO 2014 (a subset is enough: the reference maps names, not ids).
COCO_CATEGORIES = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    7: "train",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    22: "elephant",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    32: "tie",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    46: "wine glass",
    47: "cup",
    56: "broccoli",
    58: "hot dog",
    62: "chair",
    63: "couch",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    75: "remote",
    81: "sink",
    88: "teddy bear",
}

# image id -> (split, instance category ids, reference captions)
COCO_IMAGES = {
    101: (
        "val",
        [1, 4, 4, 3],
        [
            "A man riding a motorcycle down a city street.",
            "A person on a motor bike next to parked cars.",
        ],
    ),
    102: (
        "val",
        [70, 81],
        [
            "A white toilet seat in a small bathroom.",
            "The bathroom has a toilet and a sink.",
        ],
    ),
    103: (
        "val",
        [22, 25],
        [
            "A baby elephant walks beside its mother.",
            "Elephants and a giraffe in a grassy field.",
        ],
    ),
    104: (
        "val",
        [17, 63, 75],
        [
            "A cat sleeping on a sofa next to a remote control.",
            "A kitten curled up on the couch.",
        ],
    ),
    105: (
        "val",
        [7],
        [
            "A passenger train pulls into the station.",
            "A train on the train tracks near a platform.",
        ],
    ),
    106: (
        "val",
        [1, 35, 36, 27],
        [
            "Skiers with skis and a snowboard on a snowy slope.",
            "A woman carrying a backpack stands in the snow.",
        ],
    ),
    201: (
        "train",
        [18, 37, 1],
        [
            "Two dogs chase a ball in the park.",
            "A boy throws a frisbee to his puppy.",
        ],
    ),
    202: (
        "train",
        [46, 67, 73, 32],
        [
            "A wine glass on a dining table next to a laptop.",
            "A man in a bow tie sits at a desk with a computer.",
        ],
    ),
}

# Generated captions exercising each quirk (image_id, caption).
CHAIR_CAPTIONS = [
    (101, "A man rides a motor bike down the street while another person rides a motorcycle past a bus."),
    (102, "The seat is next to the toilet and a chair stands in the corner."),
    (102, "A toilet seat and a sink. There is a bench by the door."),
    (103, "A baby elephant stands next to an adult giraffe and a baby bird."),
    (104, "A black cat sleeps on a couch with a remote, a cheesecake and a laptop computer nearby."),
    (105, "A passenger train on the train track, with a traffic light and a fire hydrant."),
    (106, "Two skiers carry skis and a snowboard; people and children watch from a bench."),
    (201, "Two dogs and a puppy play with a frisbee and a ball while women watch."),
    (202, "A wine glass and wine glasses sit on the table near a bow tie, a teddy bear and hot dogs."),
    (202, "It is a sunny day."),
    (104, "A television and a tv monitor are on the desk. A kitten lies on the"),
]


def write_coco_annotations(folder: Path) -> Path:
    """Write ``instances_{train,val}2014.json`` and ``captions_{train,val}2014.json`` for COCO_IMAGES."""
    folder.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES.items()]
    for split in ("train", "val"):
        ids = [i for i, (s, _, _) in COCO_IMAGES.items() if s == split]
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in ids]
        instances = [
            {"id": 1000 * i + k, "image_id": i, "category_id": c} for i in ids for k, c in enumerate(COCO_IMAGES[i][1])
        ]
        captions = [
            {"id": 1000 * i + k, "image_id": i, "caption": c} for i in ids for k, c in enumerate(COCO_IMAGES[i][2])
        ]
        common = {"info": {}, "licenses": [], "images": images}
        (folder / f"instances_{split}2014.json").write_text(
            json.dumps({**common, "categories": categories, "annotations": instances})
        )
        (folder / f"captions_{split}2014.json").write_text(json.dumps({**common, "annotations": captions}))
    return folder


def mme_results() -> dict[str, list[dict[str, str]]]:
    """Deterministic MME results for all 14 subtasks, with the responses that parse oddly."""
    responses = [
        "Yes",
        "No",
        "yes",
        "no",
        "Yes.",
        "No.",
        "y",
        "n",
        "Not sure",
        "none",
        "The answer is yes",
        "yesterday",
        " yes",
        "  yes",
        "NO",
        "Nope",
        "",
        "Yes, there is.",
        "No, it is not",
        "YES!",
    ]
    subtasks = [
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
        "commonsense_reasoning",
        "numerical_calculation",
        "text_translation",
        "code_reasoning",
    ]
    results = {}
    k = 0
    for t, task in enumerate(subtasks):
        rows = []
        for image in range(3 + t % 4):
            name = f"{image:04d}.png" if t >= 10 else f"{task}_{image}.jpg"
            for gt in ("Yes", "No"):
                rows.append(
                    {
                        "image": name,
                        "question": f"Is this question {image} of {task} ({gt})? Please answer yes or no.",
                        "gt": gt,
                        "response": responses[(k * 7 + t) % len(responses)],
                    }
                )
                k += 1
        results[task] = rows
    return results


POPE_PHRASES = [
    "Yes", "No", "yes", "no", "Yes.", "No.", "NO", "No!", "YES", "Yes, there is a dog.", "No, there is not.",
    "There isn't a dog.", "I don't know", "I see eyes", "Nope", "", "Not really", "yes and no", "Snow covers it",
    "None", "The answer is no", "Yes. No.", "  yes  ", "No, but yes", "Nothing", "It is not there",
]  # fmt: skip


def pope_rows() -> list[tuple[str, str]]:
    """(answer, label) pairs: every phrase under both labels, plus uneven plain rows."""
    rows = [(phrase, label) for phrase in POPE_PHRASES for label in ("yes", "no")]
    return rows + [("Yes", "yes")] * 5 + [("No", "no")] * 3 + [("Yes", "no")] * 2
