"""Benchmark loaders and reference-exact scorers for vlmkit's eval suite.

Nothing heavy is imported here; import the submodule you need.

Scorers (each module's docstring names the reference script, repository and commit it follows):

* :mod:`vlmkit.eval.pope`: ``parse(answer, style="llava", label=None)``,
  ``score(answers, labels, style="llava")``, ``score_splits({split: (answers, labels)}, style)``;
  styles ``"llava"``, ``"opera"``, ``"vcd"``, ``"lmms_eval"``.
* :mod:`vlmkit.eval.chair`: ``Chair(gt_objects, synonyms=None)``, ``Chair.from_coco(dir, image_ids=None)``,
  ``Chair.from_ground_truth(path)``, ``.save_ground_truth(path)``, ``.caption_to_words(caption)``,
  ``.score(records, trim_incomplete=False)``; ``require_nltk_data()``.
* :mod:`vlmkit.eval.mme`: ``parse(response, style="official")``, ``score({subtask: records})``.
"""
