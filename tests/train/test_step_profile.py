"""`llmjax.train.telemetry.step_profile`: op names -> rows of the step-time breakdown."""

from __future__ import annotations

import pytest

from llmjax.train.telemetry.step_profile import breakdown, categorise, op_names


@pytest.mark.parametrize("name, expected", [
    ("jit(wrapped)/jvp(Transformer)/Block_0/attn/q/dot_general", ("matmul", False)),
    ("jit(wrapped)/transpose(jvp(Transformer))/Block_3/mlp/wo/dot_general", ("matmul", True)),
    ("jit(wrapped)/jvp(Transformer)/Block_1/attn/dot_general", ("attention", False)),
    ("jit(wrapped)/transpose(jvp(Transformer))/Block_1/attn/reduce_max", ("attention", True)),
    ("jit(wrapped)/jvp(Transformer)/Block_0/attn/rope/sin", ("rope", False)),
    ("jit(wrapped)/transpose(jvp(Transformer))/Block_0/attn/rope/pad", ("rope", True)),
    ("jit(wrapped)/jvp(Transformer)/Block_2/mlp_norm/rsqrt", ("norm_act", False)),
    ("jit(wrapped)/jvp(Transformer)/lm_head/dot_general", ("lm_head", False)),
    ("jit(wrapped)/jvp(Transformer)/embed/jit(_take)/gather", ("embed", False)),
    ("jit(wrapped)/jvp(loss)/reduce_max", ("loss", False)),
    ("jit(wrapped)/transpose(jvp(loss))/mul", ("loss", True)),
    ("jit(wrapped)/optimizer/jit(clip)/min", ("optimizer", False)),
    ("jit(wrapped)/metrics/sqrt;jit(wrapped)/optimizer/sqrt", ("metrics", False)),
    ("jit(wrapped)/lossy/add", ("other", False)),  # a scope name is a whole path element
    ("reduce_sum", ("other", False)),
])
def test_categorise(name, expected):
    assert categorise(name) == expected


def test_breakdown_scales_shares_to_the_step_time():
    q = "jit(f)/jvp(Transformer)/Block_0/attn/q/dot_general"
    hlo = (f'ENTRY %main {{\n  %fusion.1 = f32[8]{{0}} fusion(%p), kind=kLoop, metadata={{op_name="{q}" '
           'stack_frame_id=1}\n  ROOT %fusion.2 = f32[8]{0} fusion(%fusion.1), '
           'metadata={op_name="jit(f)/optimizer/mul"}\n}')
    names = op_names(hlo)
    assert names == {"fusion.1": q, "fusion.2": "jit(f)/optimizer/mul"}
    rows = {r["category"]: r for r in breakdown({"fusion.1": 3.0, "fusion.2": 1.0}, names, step_s=2.0)}
    assert rows["matmul"]["share"] == 0.75 and rows["matmul"]["forward_ms"] == 1500.0
    assert rows["optimizer"]["forward_ms"] == 500.0 and rows["loss"]["share"] == 0.0
