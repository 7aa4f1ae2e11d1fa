"""Benchmarks, reference-exact scorers, the eval runner and reports: vlmkit's eval suite.

Nothing heavy is imported here; import the submodule you need.

Benchmarks (:mod:`vlmkit.eval.benchmarks`): one module per benchmark, each holding its scorer,
its loader for the official layout, its default prompts and one ``BENCHMARK`` object (loader,
prompts, answer-parser styles, scorer, generation length, primary metric), registered by its file
name; ``benchmarks.get(name)``, ``benchmarks.names()``. Adding a benchmark is adding one file. Each
scorer module's docstring names the reference script (repository, path, commit) it reproduces and
its documented deviations. Scorers return fractions (MME: points, as the official tool) plus a
``"warnings"`` list; a zero denominator gives 0.0 and a warning instead of an exception.

* :mod:`vlmkit.eval.benchmarks.pope`: ``parse(answer, style="llava", label=None) -> "yes" | "no" |
  "other"``; ``score(answers, labels, style="llava") -> {TP, FP, TN, FN, other, n, accuracy,
  precision, recall, f1, yes_ratio, style, warnings}``; ``score_splits({split: (answers, labels)},
  style) -> {splits, mean_f1, mean_accuracy, style, warnings}``; ``STYLES``, ``SPLITS``, ``PROMPTS``;
  ``load_pope(path, image_dir=None, splits=None, prompt=...)``: question JSON lines + images, or
  lmms-eval parquet.
* :mod:`vlmkit.eval.benchmarks.chair`: ``Chair(gt_objects, synonyms=None)``;
  ``Chair.from_coco(annotation_dir, image_ids=None, synonyms=None)``;
  ``Chair.from_ground_truth(path, synonyms=None)``; ``chair.save_ground_truth(path)``;
  ``chair.image_ids``; ``chair.ground_truth(image_id)``; ``chair.caption_to_words(caption) ->
  CaptionWords(words, node_words, idxs, double_words)``; ``chair.score(records,
  trim_incomplete=False) -> {overall: {CHAIRs, CHAIRi, Recall, Len}, counts, sentences, warnings}``;
  ``require_nltk_data()``; ``load_chair(image_dir, ground_truth, num_images=500, seed=42,
  image_ids=None, prompt=...)``.
* :mod:`vlmkit.eval.benchmarks.mme`: ``parse(response, style="official")``; ``score({subtask:
  [{image, question, gt, response}]}, style="official") -> {subtasks: {name: {acc, acc_plus, score,
  ...}}, perception, cognition, total, style, warnings}``; ``PERCEPTION``, ``COGNITION``,
  ``SUBTASKS``; ``load_mme(root, subtasks=None, prompt=...)``.
* :mod:`vlmkit.eval.benchmarks.video`: ``parse_choice(response, options, style) -> letter | None``
  with styles ``"mvbench"``, ``"videomme"``, ``"egoschema"``; ``score(records, style,
  group_by=("task_type",)) -> {accuracy, correct, answered, total, groups, style, warnings}``;
  ``load_mvbench(root, tasks=None, num_frames=16, video_dirs=None, prompt=...)``,
  ``load_videomme(annotations, video_dir, num_frames=32, durations=None, prompt=...)``,
  ``load_egoschema(questions, video_dir, answers=None, num_frames=32, prompt=...)``.

Loaders return a :class:`~vlmkit.eval.benchmarks.base.SampleSet` (iterable of
:class:`~vlmkit.eval.benchmarks.base.Sample`, with ``len`` and an ``info`` dict to record).
``Sample(sample_id, prompt, target, media, metadata, answer_prefix)``; ``sample.load_media()``
reads the images or sampled frames and raises :class:`~vlmkit.errors.InputError` naming a corrupt
file. Media references and frame sampling are in :mod:`vlmkit.eval.media`.

Running (``vlmkit eval``, ``vlmkit score``, ``vlmkit report``; :mod:`vlmkit.eval.cli`):

* :mod:`vlmkit.eval.runner`: ``run(RunSpec(model, bench, DataOptions(path, ...), out, methods=(...),
  decoding=Decoding(...), batch_size=..., seed=..., limit=..., rerun_errors=...))`` generates
  (batched, resumable, sharded over accelerate processes) and scores; ``score_run(run_dir,
  style=None)``; the sample-row schema and what the timings measure are in its docstring.
* :mod:`vlmkit.eval.records`: the run directory's files (``config.json``, ``shards/``,
  ``samples.jsonl``, ``scores.json``, ``.lock``) and the resume check.
* :mod:`vlmkit.eval.suite`: YAML suites (``eval/*.yaml``); :mod:`vlmkit.eval.report`: tables and plots.
"""
