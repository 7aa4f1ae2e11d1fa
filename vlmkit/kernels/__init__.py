"""The hot ops of token pruning and merging: a PyTorch reference and a Triton kernel each.

- `attention_rows`: attention of a few query rows (last text token, [CLS]) over the keys.
- `attention_colsum`: attention received by each key, summed over queries and heads.
- `merge_tokens`: assign tokens to targets and take the weighted mean in one pass.
- `greedy_maxmin`: DivPrune's farthest-point selection without an (N x N) matrix.

Each op has its own module (``rows``, ``colsum``, ``merge``, ``maxmin``, named apart from the
functions so that they do not shadow each other) holding the public dispatcher and the readable
PyTorch reference ``<op>_reference`` (the specification, float32 accumulation). The Triton
kernels live in ``_triton_attention.py`` (rows and colsum), ``_triton_merge.py`` and
``_triton_maxmin.py``, imported only when used. The dispatcher picks Triton for CUDA tensors
when Triton imports, no input is float64 and no gradient is needed, PyTorch otherwise;
``VLMKIT_KERNELS=torch|triton`` (read at call time) forces one. Kernels never patch models.
"""
from vlmkit.kernels.colsum import attention_colsum
from vlmkit.kernels.rows import attention_rows
from vlmkit.kernels.maxmin import greedy_maxmin
from vlmkit.kernels.merge import merge_tokens

__all__ = ["attention_colsum", "attention_rows", "greedy_maxmin", "merge_tokens"]
