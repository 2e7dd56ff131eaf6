"""The int8 engines (q2ext kernels, oneDNN) against the reference, and the engine selector.

Oracle: q2ext.reference.gemm (int GEMM exact; the fp32 epilogue (acc * s_x) * s_W + b).
oneDNN's int32 accumulators are checked exactly through unit scales (fp32 holds every
|acc| < 2^24 exactly); its epilogue rounds acc * (s_x * s_W) + b in another order, so
its outputs must lie within a few fp32 ulps of |acc s_x s_W| + |b| of the reference.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import q2ext
from q2ext.nn import gemm_engines
from q2ext.nn.gemm_layers import Int8Conv2d, Int8Linear
from q2ext.reference import gemm as R

U32 = 2.0 ** -24


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private engine cache directory, no override from the environment."""
    monkeypatch.setenv("Q2EXT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("Q2EXT_INT8_ENGINE", raising=False)
    monkeypatch.delenv("Q2EXT_INT4_ENGINE", raising=False)
    gemm_engines.clear_cache()
    yield tmp_path
    gemm_engines.clear_cache()


def _linear(n, k, signed, gen, bias=True, scales=True):
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-3 if scales else torch.ones(n)
    x_scale = torch.tensor([0.031]) if scales else torch.ones(1)
    b = torch.randn(n, generator=gen) if bias else None
    return Int8Linear(w, w_scale, x_scale, b, -128 if signed else 0, 127 if signed else 255)


def _codes(x, m):
    return R.quantize_activation(x, m.x_scale, m.quant_min, m.quant_max)[0]


@pytest.mark.parametrize("engine", ["q2ext", "onednn"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 59, 97), (97, 65, 130), (16, 128, 1025), (3, 1025, 64)])
def test_linear_int32_accumulation_is_exact(engine, signed, m, n, k):
    """Unit scales, no bias: the fp32 output is the int32 accumulator itself."""
    gen = torch.Generator().manual_seed(m * n + k)
    lin = _linear(n, k, signed, gen, bias=False, scales=False)
    lin.engine = engine
    lo, hi = (-128, 128) if signed else (0, 256)
    x = torch.randint(lo, hi, (m, k), generator=gen).float()
    with torch.no_grad():
        got = lin(x)
    want = R.int_mm(_codes(x, lin), lin.weight_int8).float()
    assert want.abs().max() < 2 ** 24
    assert torch.equal(got, want)


@pytest.mark.parametrize("engine", ["q2ext", "onednn"])
@pytest.mark.parametrize("m,n,k", [(1, 33, 97), (64, 130, 259)])
def test_linear_epilogue_rounding(engine, m, n, k):
    gen = torch.Generator().manual_seed(k)
    lin = _linear(n, k, True, gen)
    lin.engine = engine
    x = torch.randn(m, k, generator=gen)
    with torch.no_grad():
        got = lin(x)
    acc = R.int_mm(_codes(x, lin), lin.weight_int8).double()
    exact = acc * lin.x_scale.double() * lin.w_scale.double() + lin.bias.double()
    ulp_scale = (acc * lin.x_scale.double() * lin.w_scale.double()).abs() + lin.bias.double().abs()
    assert ((got.double() - exact).abs() <= 4 * U32 * ulp_scale + 1e-30).all()
    ref = R.w8a8_epilogue(R.int_mm(_codes(x, lin), lin.weight_int8), lin.x_scale, lin.w_scale, lin.bias, False,
                          torch.float32)
    if engine == "q2ext":
        assert torch.equal(got, ref)  # same epilogue order as the reference


CONVS = [  # cin, cout, kernel, stride, padding, dilation, groups, H, W
    (3, 5, 1, 1, 0, 1, 1, 7, 5), (8, 12, 3, 1, 1, 1, 1, 11, 9), (8, 12, 3, 2, 1, 1, 2, 13, 12),
    (6, 10, (3, 2), (2, 1), (2, 1), (2, 3), 1, 13, 12), (16, 16, 3, 1, 1, 1, 16, 9, 9), (5, 7, 5, 3, 2, 1, 1, 17, 1),
]


@pytest.mark.parametrize("engine", ["q2ext", "onednn"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("cin,cout,k,s,p,d,g,h,w", CONVS)
def test_conv_engines_against_reference(engine, signed, cin, cout, k, s, p, d, g, h, w):
    """Exact int32 sums (unit scales), and with real scales within the epilogue rounding;
    NCHW and channels-last, batch 1 and 2."""
    gen = torch.Generator().manual_seed(cin * cout + h)
    kk = (k, k) if isinstance(k, int) else k
    wq = torch.randint(-127, 128, (cout, cin // g, *kk), generator=gen, dtype=torch.int8)
    args = ((s, s) if isinstance(s, int) else s, (p, p) if isinstance(p, int) else p,
            (d, d) if isinstance(d, int) else d, g)
    lo, hi = (-128, 127) if signed else (0, 255)
    for unit in (True, False):
        w_scale = torch.ones(cout) if unit else torch.rand(cout, generator=gen) * 0.01 + 1e-3
        x_scale = torch.ones(1) if unit else torch.tensor([0.047])
        bias = None if unit else torch.randn(cout, generator=gen)
        conv = Int8Conv2d(wq, w_scale, x_scale, bias, *args, quant_min=lo, quant_max=hi)
        conv.engine = engine
        x = torch.randint(lo, hi + 1, (2, cin, h, w), generator=gen).float() * x_scale
        codes = torch.round(x / x_scale).clamp(lo, hi)
        acc = F.conv2d(codes.double(), wq.double(), None, *args)
        exact = acc * (x_scale.double() * w_scale.double()).reshape(1, -1, 1, 1)
        if bias is not None:
            exact = exact + bias.double().reshape(1, -1, 1, 1)
        bound = 4 * U32 * (exact.abs() + (0 if bias is None else bias.double().abs().reshape(1, -1, 1, 1)))
        if engine == "onednn" and conv._onednn_shape_reasons(x):
            with pytest.raises(RuntimeError, match="int engine 'onednn' cannot run this layer"):
                conv(x)
            continue
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1]):
            with torch.no_grad():
                got = conv(inp).double()
            want = exact[:inp.shape[0]]
            if unit:
                assert torch.equal(got, want)
            else:
                assert ((got - want).abs() <= bound[:inp.shape[0]]).all()


def test_onednn_conv_random_regular_shapes():
    """A randomized sweep of the shapes the oneDNN conv engine accepts (square, the usual
    paddings, groups and depthwise, small images, both zero points): exact int32 sums."""
    gen = torch.Generator().manual_seed(11)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=gen))]

    checked = 0
    while checked < 60:
        k, s, d = pick([1, 3, 5, 7]), pick([1, 2]), pick([1, 1, 2])
        p = pick([(k - 1) // 2 * d, 0])
        c = pick([1, 3, 8, 16])
        g, cin, cout = pick([(1, c, pick([1, 7, 16])), (2, 2 * c, 2 * pick([1, 4])), (c, c, c)])
        h, w = pick(list(range(1, 21))), pick(list(range(1, 21)))
        wq = torch.randint(-127, 128, (cout, cin // g, k, k), generator=gen, dtype=torch.int8)
        signed = bool(pick([0, 1]))
        conv = Int8Conv2d(wq, torch.ones(cout), torch.ones(1), None, (s, s), (p, p), (d, d), g,
                          -128 if signed else 0, 127 if signed else 255)
        conv.engine = "onednn"
        x = torch.randint(-128 if signed else 0, 128 if signed else 256, (pick([1, 2]), cin, h, w),
                          generator=gen).float()
        oh, ow = conv._out_hw(h, w)
        if oh < 1 or ow < 1 or conv._onednn_shape_reasons(x):
            continue
        with torch.no_grad():
            got = conv(x)
        assert torch.equal(got.double(), F.conv2d(x.double(), wq.double(), None, s, p, d, g)), (k, s, p, d, g, h, w)
        checked += 1


def test_onednn_conv_shapes_with_known_wrong_results_are_refused():
    # a 1-wide strided output: oneDNN returned wrong sums here
    conv = Int8Conv2d(torch.ones(8, 8, 3, 3, dtype=torch.int8), torch.ones(8), torch.ones(1), None, (2, 2),
                      (0, 0), (1, 1), 1)
    conv.engine = "onednn"
    with pytest.raises(RuntimeError, match="strided conv on a small input"):
        conv(torch.zeros(1, 8, 15, 4))
    conv.engine = "auto"
    with torch.no_grad():
        conv(torch.zeros(1, 8, 15, 4))
    assert list(conv.engines.values()) == ["q2ext"]


def test_an_engine_that_disagrees_is_not_chosen(cache):
    fast_but_wrong = torch.ones(4, 4)
    with pytest.warns(RuntimeWarning, match="disagrees with q2ext"):
        engine = gemm_engines.choose("toy 4x4", {"q2ext": lambda: torch.zeros(4, 4) + 1e-3,
                                                 "onednn": lambda: fast_but_wrong}, {})
    assert engine == "q2ext"
    assert gemm_engines.agree(torch.ones(3) * (1 + 1e-6), torch.ones(3))
    assert not gemm_engines.agree(torch.ones(3) * 1.01, torch.ones(3))


def test_selector_measures_once_and_caches_per_machine(cache):
    gen = torch.Generator().manual_seed(0)
    lin = _linear(64, 96, True, gen)
    x = torch.randn(8, 96, generator=gen)
    calls = []
    real = gemm_engines.measure
    try:
        gemm_engines.measure = lambda cands, outputs=None, **kw: (
            calls.append(sorted(cands)) or real(cands, rounds=1, calls=1, outputs=outputs))
        with torch.no_grad():
            lin(x)
            lin(x)  # same shape: no second measurement
            lin(x[:3])  # a new shape: measured
    finally:
        gemm_engines.measure = real
    assert calls == [["onednn", "q2ext"], ["onednn", "q2ext"]]
    assert len(lin.engines) == 2 and set(lin.engines.values()) <= {"q2ext", "onednn"}
    disk = json.loads((cache / gemm_engines.CACHE_FILE).read_text())
    table = disk[gemm_engines.machine_key()]
    assert {k: table[k] for k in lin.engines} == lin.engines
    # a new process (empty memory) reads the file instead of measuring
    gemm_engines.clear_cache()
    key = next(iter(lin.engines))
    assert gemm_engines.cached_engine(key) == lin.engines[key]
    # another machine's entries are not used
    disk = {"another CPU | 2 threads": {key: "nonexistent"}}
    (cache / gemm_engines.CACHE_FILE).write_text(json.dumps(disk))
    gemm_engines.clear_cache()
    assert gemm_engines.cached_engine(key) is None


def test_override_by_environment_and_layer(cache, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    lin = _linear(16, 32, True, gen)
    x = torch.randn(4, 32, generator=gen)
    for forced in ("q2ext", "onednn"):
        monkeypatch.setenv("Q2EXT_INT8_ENGINE", forced)
        lin.engines.clear()
        with torch.no_grad():
            lin(x)
        assert set(lin.engines.values()) == {forced}
    lin.engine = "q2ext"  # the layer's own setting beats the environment
    lin.engines.clear()
    with torch.no_grad():
        lin(x)
    assert set(lin.engines.values()) == {"q2ext"}
    assert not (cache / gemm_engines.CACHE_FILE).exists()  # forced choices are not measured
    monkeypatch.setenv("Q2EXT_INT8_ENGINE", "fastest")
    lin.engine = "auto"
    with pytest.raises(ValueError, match="Q2EXT_INT8_ENGINE must be one of"):
        lin(x)
    lin.engine = "mkl"
    with pytest.raises(ValueError, match="the layer's engine must be one of"):
        lin(x)


def test_forced_engine_that_cannot_run_lists_why(cache):
    lin = Int8Linear.from_float(torch.nn.Linear(8, 4))  # dynamic per-row scales
    lin.engine = "onednn"
    with pytest.raises(RuntimeError, match="dynamic per-row activation scales"):
        lin(torch.randn(2, 8))


def test_convert_engine_argument_and_summary(cache):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 5))
    qat = q2ext.prepare(net, q2ext.QConfig(w_bits=8, a_bits=8)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        qat(x)
    for engine in ("q2ext", "onednn"):
        intm = q2ext.convert(qat, engine=engine, example_inputs=x)
        layers = [m for m in intm.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
        assert len(layers) == 2 and all(set(m.engines.values()) == {engine} for m in layers)
        text = q2ext.summary(intm)
        assert "Int8Conv2d" in text and f"{engine}" in text and "2x3x6x6" in text
    with pytest.raises(ValueError, match="convert: engine must be one of"):
        q2ext.convert(qat, engine="mkl")
    with pytest.raises(TypeError, match="example_inputs"):
        q2ext.convert(qat, example_inputs=[x])


def test_measure_is_interleaved():
    order = []
    gemm_engines.measure({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2, calls=1)
    assert order == ["a", "b", "a", "b", "a", "b"]
