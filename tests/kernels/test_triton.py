"""Runs ``triton_cases.py`` (Triton kernels vs references) in a fresh process.

Without a GPU, Triton runs only in its interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is imported; in this process torch has imported it
already. With a GPU the cases run compiled, and the default dispatch is checked here too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.conftest import TOLERANCE, relative_error
from vlmkit.kernels import attention_colsum, attention_rows, greedy_maxmin, merge_tokens
from vlmkit.kernels.colsum import attention_colsum_reference
from vlmkit.kernels.maxmin import greedy_maxmin_reference
from vlmkit.kernels.merge import merge_tokens_reference
from vlmkit.kernels.rows import attention_rows_reference

CASES = Path(__file__).with_name("triton_cases.py")
REPO = Path(__file__).resolve().parents[2]


def _run_cases(marker: str) -> None:
    pytest.importorskip("triton", reason="Triton is not installed: pip install 'vlmkit[triton]'")
    env = dict(os.environ)
    env.pop("VLMKIT_KERNELS", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", marker, str(CASES)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"


def test_triton_kernels_match_references():
    _run_cases("not slow")


@pytest.mark.slow
def test_triton_kernels_match_references_large_sweep():
    _run_cases("slow")


@pytest.mark.gpu
def test_cuda_default_dispatch_uses_triton_and_matches(monkeypatch):
    """On a GPU the default dispatch takes the compiled kernels (all autotune configs)."""
    pytest.importorskip("triton")
    from vlmkit.kernels import _dispatch

    monkeypatch.delenv("VLMKIT_KERNELS", raising=False)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 14, 3, 64, device="cuda").to(dtype)
        k = torch.randn(2, 2, 600, 64, device="cuda").to(dtype)
        assert _dispatch.choose_backend("attention_rows", q, k) == "triton"
        kwargs = dict(scale=0.125, num_kv_groups=7)
        assert relative_error(attention_rows(q, k, **kwargs), attention_rows_reference(q, k, **kwargs)) <= TOLERANCE[dtype]
        qc = torch.randn(2, 14, 600, 64, device="cuda").to(dtype)
        assert relative_error(
            attention_colsum(qc, k, **kwargs), attention_colsum_reference(qc, k, **kwargs)
        ) <= TOLERANCE[dtype]
        x = torch.randn(2, 576, 1024, device="cuda").to(dtype)
        target = torch.randint(-1, 64, (2, 576), device="cuda")
        assert relative_error(
            merge_tokens(x, target, num_targets=64)[0], merge_tokens_reference(x, target, num_targets=64)[0]
        ) <= TOLERANCE[dtype]
        assert torch.equal(greedy_maxmin(x, 64), greedy_maxmin_reference(x, 64))


def test_jit_code_reads_only_globals_the_compiler_accepts():
    """Triton's interpreter runs any Python, its compiler does not: a @triton.jit function may only
    read globals that are constexpr values, jit functions or modules (a plain module-level bool broke
    every kernel on the first real GPU while all interpreter tests passed)."""
    import ast
    import importlib
    import inspect
    import textwrap

    triton = pytest.importorskip("triton")
    import triton.language as tl

    checked = 0
    for name in ("_triton_common", "_triton_attention", "_triton_merge", "_triton_maxmin"):
        module = importlib.import_module(f"vlmkit.kernels.{name}")
        for value in vars(module).values():
            while isinstance(value, triton.runtime.Autotuner):
                value = value.fn
            if not isinstance(value, triton.runtime.JITFunction) or value.__module__ != module.__name__:
                continue
            tree = ast.parse(textwrap.dedent(inspect.getsource(value.fn)))
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in vars(module):
                    used = vars(module)[node.id]
                    ok = isinstance(used, (tl.constexpr, triton.runtime.JITFunction, type(tl))) or used is tl
                    assert ok, f"{name}.{value.fn.__name__} reads global {node.id!r} ({type(used).__name__})"
            checked += 1
    assert checked >= 4
