"""`python -m dsv3_jax.analysis`: the ISCA '25 paper's figures from the configs, and the formulas
behind them (KV cache against init_cache, parameter counts against the model, topology counts)."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.analysis import ep_bound, fp8, kv_cache, moe_economics, network
from dsv3_jax.analysis.models import V2_236B
from dsv3_jax.analysis.report import Row, format_table
from dsv3_jax.config import preset
from dsv3_jax.model import Transformer

CHECKED_IDS = (
    [f"kv_bytes_per_token.{m}" for m in ("deepseek_v3", "qwen2_5_72b", "llama3_1_405b")]
    + [f"train_gflop_per_token.{m}" for m in ("deepseek_v2", "deepseek_v3", "qwen_72b", "llama_405b")]
    + [f"{q}.{h}" for q in ("ep_step_us", "tpot_ms") for h in ("h800_ib", "gb200_nvl72")]
    + [f"network_cost_per_endpoint_k.{t}" for t in ("ft2", "mpft", "ft3", "slim_fly", "dragonfly")]
)

# Rows that miss the paper by more than 1%, with the difference their module docstring explains.
DOCUMENTED = {
    "train_gflop_per_token.qwen_72b": 0.1227,  # the paper used 6(12 L d^2 + V d) (train_flops)
    "train_gflop_per_token.llama_405b": 0.0103,  # same
    "decode_tokens_per_s.h800_ib": 0.0114,  # 67.8 printed as "~67" (ep_bound)
    "decode_tokens_per_s.gb200_nvl72": 0.0165,  # 1219.8 printed as "~1200"
    "params_activated_b.deepseek_v3": -0.0101,  # 36.6B printed as "37B" (moe_economics)
    "network_cost_per_endpoint_k.slim_fly": 0.0117,  # 4.45 vs a 2-digit 4.4; total within 0.4%
    "network_cost_m.dragonfly": 0.0224,  # one link price for copper and optics (network)
    "network_cost_per_endpoint_k.dragonfly": 0.0215,
    "fp8_accum_max_rel_err_pct.tensor_core_only": -0.3865,  # "nearly 2%", shapes unstated (fp8)
}
EXACT = ("kv_bytes_per_token.", "ep_step_us.h800_ib", "ep_step_us.gb200_nvl72", "ep_layer_us.h800_ib",
         "network_endpoints.ft2", "network_endpoints.mpft", "network_endpoints.ft3",
         "network_endpoints.slim_fly", "network_switches.slim_fly", "network_links.slim_fly")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """One run of the CLI with --json and --plots: (rows by id, plot directory)."""
    out = tmp_path_factory.mktemp("plots")
    proc = subprocess.run([sys.executable, "-m", "dsv3_jax.analysis", "--json", "--plots", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    return {r["id"]: r for r in rows}, out


def test_json_has_every_checked_id_and_field(cli):
    rows, _ = cli
    missing = [i for i in CHECKED_IDS if i not in rows]
    assert not missing, missing
    for r in rows.values():
        assert set(r) == {"id", "paper", "ours", "unit", "source"}, r
        assert isinstance(r["ours"], float | int) and math.isfinite(r["ours"]), r


def test_every_row_matches_the_paper_or_its_documented_difference(cli):
    rows, _ = cli
    for r in rows.values():
        if r["paper"] is None:
            continue
        rel = (r["ours"] - r["paper"]) / r["paper"]
        if r["id"] in DOCUMENTED:
            tol = 0.01 if r["id"].startswith("fp8_") else 0.002
            assert rel == pytest.approx(DOCUMENTED[r["id"]], abs=tol), (r, rel)
        elif r["id"].startswith(EXACT):
            assert r["ours"] == pytest.approx(r["paper"], rel=1e-12), r
        else:
            assert abs(rel) <= 0.01, (r, rel)
    assert rows["kv_bytes_per_token.deepseek_v3"]["ours"] == 70_272


def test_plots_are_written(cli):
    _, out = cli
    for name in ("kv_cache.png", "tpot.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_logfmt_beats_fp8_on_moe_outputs(cli):
    """P1 §3.2's ordering on our MoE outputs: LogFMT-8 under E4M3 under E5M2, LogFMT-10 near BF16."""
    rows, _ = cli
    err = {k: rows[f"combine_rel_err_pct.{k}"]["ours"]
           for k in ("bf16", "e4m3", "e5m2", "logfmt8", "logfmt10")}
    assert err["logfmt8"] < err["e4m3"] < err["e5m2"]
    assert err["bf16"] < err["logfmt10"] < 3 * err["bf16"] < err["logfmt8"]


def test_v3_kv_figure_is_what_init_cache_allocates():
    cfg = preset("v3_671b")
    T = kv_cache.CONTEXT
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, T, jnp.bfloat16))
    allocated = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert allocated == kv_cache.mla_bytes_per_token(cfg) * T == 70_272 * T
    assert kv_cache.mla_bytes_per_token(cfg) == cfg.kv_cache_bytes_per_token


def _n_params(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", ["small", "v2_lite", "v3_671b", "v2_236b"])
def test_closed_form_param_count_matches_the_model(name):
    cfg = V2_236B if name == "v2_236b" else preset(name)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    got = moe_economics.param_count(cfg)
    assert got.total + got.mtp == _n_params(model)
    assert got.mtp == _n_params(model.mtp)


def test_topologies_from_the_port_count():
    ft2, ft3 = network.fat_tree_2(64), network.fat_tree_3(64)
    assert (ft2.endpoints, ft2.switches, ft2.links) == (2048, 96, 2048)
    assert (ft3.endpoints, ft3.switches, ft3.links) == (65536, 5120, 131072)
    sf = network.slim_fly(64)  # q = 28: 42 network ports + 21 endpoints fit; q = 29 would need 65
    assert (sf.switches, sf.endpoints) == (2 * 28 ** 2, 2 * 28 ** 2 * 21)
    # every pair of the 513 Dragonfly groups is joined by exactly one global link
    df = network.dragonfly(64)
    assert df.links - 513 * 32 * 31 // 2 == 513 * 512 // 2
    # MPFT costs what FT2 costs per endpoint, whatever the prices
    mpft = network.multi_plane(ft2, 8)
    for prices in ((1.0, 0.0), (0.0, 1.0), (3.0, 7.0)):
        per_endpoint = network.cost(ft2, prices) / ft2.endpoints
        assert network.cost(mpft, prices) / mpft.endpoints == pytest.approx(per_endpoint)


def test_ep_step_reads_the_wire_formats_and_the_config():
    cfg = preset("v3_671b")
    sc = ep_bound.decode_scenario(cfg)
    assert (sc.experts_per_token, sc.n_layers, sc.dispatch_bytes, sc.combine_bytes) == (9, 61, 1, 2)
    assert ep_bound.wire_bytes_per_element("fp8", 7168) == pytest.approx(1 + 4 / 128)
    # halving the bandwidth doubles the step; TPOT = 61 layers x 2 micro-batches x step
    assert sc.step_s(25e9) == pytest.approx(2 * sc.step_s(50e9))
    assert sc.tpot_s(50e9) == pytest.approx(122 * sc.step_s(50e9))


def test_fp8_promotion_cuts_accumulation_error():
    a, b = fp8.operands(32, 32, 1024, "randn", np.random.default_rng(0))
    (tc, pr, f32), metric = fp8.run(a, b, ["P1: align 32 products, RZ"])
    assert metric == "|err|/rms(y)"
    assert f32[2] < pr[2] < tc[2] / 5


def test_format_table_prints_paper_ours_and_difference():
    rows = [Row("a.b", 100.0, 101.0, "x", "P1"), Row("c.d", None, 70272, "B", "ours")]
    text = format_table([("t", rows)])
    assert "+1.00%" in text and "70,272" in text and "a.b" in text.splitlines()[2]
