"""Group-wise quantization (engine/compression.py): packing, error bounds, layout, sizes, configs."""
from __future__ import annotations

import math

import pytest
import torch

from flexgen_helm import CompressionConfig, ConfigError
from flexgen_helm.engine import compression as C

BITS = (2, 3, 4, 8)


def group_steps(shape, cfg, meta):
    """Per-element (lo, step) of its group, broadcast back to `shape` (test-side re-derivation)."""
    outer, n, ng, g, inner = C._layout(shape, cfg)
    m = meta.float().view(outer, ng, 1, inner, -1).expand(outer, ng, g, inner, -1)
    m = m.reshape(outer, ng * g, inner, -1)[:, :n].reshape(*shape, -1)
    return (None, m[..., 0]) if cfg.symmetric else (m[..., 0], m[..., 1])


def brute_force_groups(x: torch.Tensor, cfg: CompressionConfig) -> list[torch.Tensor]:
    """The groups by definition: group_size consecutive elements along group_dim, per other index."""
    xm = x.movedim(cfg.group_dim, -1).reshape(-1, x.shape[cfg.group_dim])
    g = min(cfg.group_size, xm.shape[1])
    return [row[i:i + g] for row in xm for i in range(0, xm.shape[1], g)]


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_exact(bits):
    block = C._BLOCK[bits][0]
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (5 * block,), dtype=torch.uint8, generator=gen)
    packed = torch.empty(5 * C._BLOCK[bits][1], dtype=torch.uint8)
    C._pack(codes, bits, packed)
    back = torch.empty_like(codes)
    C._unpack(packed, bits, back)
    assert torch.equal(back, codes)
    assert packed.numel() * 8 == codes.numel() * bits  # honest: exactly `bits` per value


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_values_on_the_grid_survive_exactly(bits, symmetric):
    """x already quantized (grid of power-of-two step, every group spanning the full code range):
    quantize -> dequantize gives x back bit for bit, so codes survive packing and unpacking."""
    gen = torch.Generator().manual_seed(0)
    top = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    lo = -top if symmetric else 0
    q = torch.randint(lo, top + 1, (6, 64, 10), generator=gen)
    q[:, 0], q[:, 1] = lo, top  # each group (along dim 1) reaches both ends
    x = q.float() * 0.125 + (0.0 if symmetric else -1.5)
    cfg = CompressionConfig(bits, 64, 1, symmetric)
    assert torch.equal(C.fake_quantize(x, cfg), x)


def _samples():
    gen = torch.Generator().manual_seed(1)
    yield torch.randn(128, 96, generator=gen)
    yield torch.randn(67, 33, generator=gen) * 3  # neither axis divisible by the group
    yield 100 + 1e-3 * torch.randn(64, 20, generator=gen)  # offset far larger than the range
    yield 1e-6 * torch.randn(64, 20, generator=gen)  # steps in fp16 subnormals
    yield torch.cat([torch.zeros(64, 4), torch.full((64, 4), 0.1)], 1)  # constant groups
    x = torch.randn(130, 5, generator=gen)
    x[3, 2] = 50.0  # an outlier
    yield x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_dim", [0, -1])
def test_every_element_within_half_a_step_of_its_group(bits, symmetric, group_dim):
    cfg = CompressionConfig(bits, 64, group_dim, symmetric)
    for x in _samples():
        packed, meta = C.quantize(x, cfg)
        y = C.dequantize(packed, meta, x.shape, cfg, torch.float32)
        lo, step = group_steps(x.shape, cfg, meta)
        slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + (0 if lo is None else lo.abs()))
        assert ((x - y).abs() <= step / 2 + slack).all()
        # and the step is the group's own: range / levels, up to the fp16 round-up of the meta
        levels = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
        for grp, s in zip(brute_force_groups(x, cfg), brute_force_groups(step, cfg)):
            assert torch.all(s == s[0])
            if symmetric:
                rng = grp.abs().max()
            else:  # lo was rounded down to fp16: by a relative 2^-10 or the 2^-24 subnormal step
                rng = grp.max() - grp.min() + max(2 ** -10 * grp.min().abs(), 2 ** -24)
            assert s[0] <= rng / levels * (1 + 2 ** -10) + 2 ** -24


def test_weight_groups_run_along_the_output_dim():
    """group_dim=0 on an (out, in) weight: one group = 64 consecutive output rows of one input column."""
    w = torch.zeros(128, 3)
    w[:64, 0] = torch.linspace(0, 1, 64)  # one group spans [0, 1]; every other group is constant
    _, meta = C.quantize(w, CompressionConfig(4, 64, 0))
    lo, step = group_steps(w.shape, CompressionConfig(4, 64, 0), meta)
    assert torch.all(step[:64, 0] > 0.06) and torch.all(step[64:, 0] == 0) and torch.all(step[:, 1:] == 0)


@pytest.mark.parametrize("shape,group_dim,groups", [
    ((100, 3), 0, 2 * 3),       # 100 = 64 + 36 (padded)
    ((3, 10), 0, 1 * 10),       # axis shorter than a group: one group of 3
    ((2, 5, 80), -1, 2 * 5 * 2),  # head_dim 80 (opt-2.7b): 64 + 16
    ((7,), 0, 1),
])
def test_non_divisible_shapes(shape, group_dim, groups):
    cfg = CompressionConfig(4, 64, group_dim)
    x = torch.randn(shape)
    packed, meta = C.quantize(x, cfg)
    assert meta.numel() == C.meta_numel(shape, cfg) == 2 * groups
    assert packed.numel() == C.packed_nbytes(shape, cfg)
    y = C.dequantize(packed, meta, shape, cfg, torch.float32)
    assert y.shape == x.shape and (x - y).abs().max() < 0.5


def test_padding_does_not_widen_the_last_group():
    x = torch.full((65, 1), 5.0)  # second group holds one element: a zero pad would stretch it to [0, 5]
    packed, meta = C.quantize(x, CompressionConfig(4, 64, 0))
    assert torch.equal(C.dequantize(packed, meta, x.shape, CompressionConfig(4, 64, 0), torch.float32), x)


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_bits": 0}, "num_bits"), ({"num_bits": 5}, "num_bits"), ({"num_bits": 16}, "num_bits"),
    ({"num_bits": True}, "num_bits"), ({"group_size": 0}, "group_size"), ({"group_size": -64}, "group_size"),
    ({"group_size": 63}, "group_size"), ({"group_size": 64.0}, "group_size"), ({"group_dim": 1.5}, "group_dim"),
    ({"symmetric": "yes"}, "symmetric"),
])
def test_bad_configs_rejected(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        CompressionConfig(**kwargs)


def test_bad_shapes_and_buffers_rejected():
    with pytest.raises(ConfigError, match="group_dim"):
        C.quantize(torch.zeros(4, 4), CompressionConfig(4, 64, 2))
    with pytest.raises(ConfigError, match="0-d"):
        C.quantize(torch.tensor(1.0), CompressionConfig())
    packed, meta = C.quantize(torch.zeros(64, 4), CompressionConfig())
    with pytest.raises(ValueError, match="does not match"):
        C.dequantize(packed, meta, (64, 8), CompressionConfig(), torch.float32)


@pytest.mark.parametrize("shape", [(2048, 2048), (8192, 2048), (2048, 8192), (50272, 2048), (7168, 7168)])
def test_4bit_g64_weight_bytes_at_most_029_of_fp16(shape):
    cfg = CompressionConfig(4, 64, 0)
    assert C.compressed_nbytes(shape, cfg) <= 0.29 * 2 * math.prod(shape)


def test_sizes_match_the_tensors_and_symmetric_halves_the_meta():
    x = torch.randn(200, 48)
    for bits in BITS:
        for sym in (False, True):
            cfg = CompressionConfig(bits, 64, 0, sym)
            packed, meta = C.quantize(x, cfg)
            assert packed.dtype == torch.uint8 and meta.dtype == C.META_DTYPE
            assert packed.numel() + 2 * meta.numel() == C.compressed_nbytes(x.shape, cfg)
            assert packed.numel() % 8 == 0 and packed.numel() * 8 < (x.numel() + 4 * 64 * 48) * bits + 8 * 96
            assert meta.numel() == 4 * 48 * (1 if sym else 2)


def test_chunked_cpu_path_equals_one_chunk(monkeypatch):
    """The CPU chunk loop (partial blocks, rows spanning chunks) must not change a single bit."""
    x = torch.randn(3, 131, 77)
    cfgs = [CompressionConfig(b, 64, d, s) for b in BITS for d in (0, 1, -1) for s in (False, True)]
    monkeypatch.setattr(C, "_CPU_CHUNK", 1 << 30)
    whole = [(C.quantize(x, c), c) for c in cfgs]
    monkeypatch.setattr(C, "_CPU_CHUNK", 300)
    for (packed, meta), cfg in whole:
        p2, m2 = C.quantize(x, cfg)
        assert torch.equal(p2, packed) and torch.equal(m2, meta), cfg
        for dtype in (torch.float32, torch.bfloat16):
            monkeypatch.setattr(C, "_CPU_CHUNK", 300)
            a = C.dequantize(packed, meta, x.shape, cfg, dtype)
            monkeypatch.setattr(C, "_CPU_CHUNK", 1 << 30)
            assert torch.equal(a, C.dequantize(packed, meta, x.shape, cfg, dtype)), cfg


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_out_buffer(in_dtype, out_dtype):
    cfg = CompressionConfig()
    x = torch.randn(128, 40).to(in_dtype)
    packed, meta = C.quantize(x, cfg)
    y32 = C.dequantize(packed, meta, x.shape, cfg, torch.float32)
    out = torch.empty(128, 40, dtype=out_dtype)
    y = C.dequantize(packed, meta, x.shape, cfg, out_dtype, out=out)
    assert y is out and torch.equal(y, y32.to(out_dtype))  # fp32 math, one final rounding
    with pytest.raises(ValueError, match="out must be"):
        C.dequantize(packed, meta, x.shape, cfg, out_dtype, out=torch.empty(40, 128, dtype=out_dtype))


def test_kv_rows_own_a_prefix_so_tokens_can_be_appended():
    cfg = CompressionConfig(4, 64, -1)
    kv = torch.randn(10, 2 * 4, 16)  # (tokens, batch*heads, head_dim): 128 codes per token
    packed, meta = C.quantize(kv, cfg)
    for t in (1, 3, 10):
        p, m = C.quantize(kv[:t], cfg)
        assert torch.equal(packed[:p.numel()], p) and torch.equal(meta[:m.numel()], m)
    rows = [C.quantize(kv[i:i + 1], cfg) for i in range(10)]  # one token at a time, then concatenated
    y = C.dequantize(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), kv.shape, cfg,
                     torch.float32)
    assert torch.equal(y, C.dequantize(packed, meta, kv.shape, cfg, torch.float32))


def test_buffer_round_trip():
    cfg = CompressionConfig(3, 64, 0)
    x = torch.randn(70, 9)
    buf = torch.zeros(C.compressed_nbytes(x.shape, cfg) + 5, dtype=torch.uint8)
    C.to_buffer(x, cfg, out=buf)
    assert torch.equal(C.from_buffer(buf, x.shape, cfg, torch.float32), C.fake_quantize(x, cfg))
    assert torch.equal(C.to_buffer(x, cfg), buf[:C.compressed_nbytes(x.shape, cfg)])


def test_empty_tensor():
    cfg = CompressionConfig()
    packed, meta = C.quantize(torch.zeros(0, 8), cfg)
    assert packed.numel() == meta.numel() == 0
    assert C.dequantize(packed, meta, (0, 8), cfg, torch.float32).shape == (0, 8)


def test_kivi_keys_group_tokens_per_channel_and_keep_a_residual():
    cfg = CompressionConfig(2, 4, -1)
    k = torch.randn(1, 10, 2, 8)  # (batch, tokens, heads, head_dim)
    y = C.kivi_fake_quantize_keys(k, cfg, token_dim=1)
    assert torch.equal(y[:, 8:], k[:, 8:])  # 10 % 4 = 2 trailing tokens stay full precision
    assert torch.equal(y[:, :8], C.fake_quantize(k[:, :8], CompressionConfig(2, 4, 1)))
    assert not torch.equal(y[:, :8], k[:, :8])


@pytest.fixture(scope="module")
def hf_opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def test_fake_quantize_model_changes_matrices_only(hf_opt):
    import copy
    m = copy.deepcopy(hf_opt)
    cfg = CompressionConfig(4, 64, 0)
    names = C.fake_quantize_model(m, cfg)
    before = dict(hf_opt.named_parameters())
    for name, p in m.named_parameters():
        if name in names:
            assert p.dim() == 2 and torch.equal(p, C.fake_quantize(before[name], cfg))
        else:
            assert p.dim() == 1 and torch.equal(p, before[name])
    assert any("embed_tokens" in n for n in names) and any("fc1" in n for n in names)


def test_fake_quantized_kv_cache_hooks(hf_opt):
    from transformers.integrations import sdpa_attention
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    attn = hf_opt.model.decoder.layers[0].self_attn
    seen: dict[str, torch.Tensor] = {}
    raw = attn.v_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("raw", o))
    real_sdpa = sdpa_attention.sdpa_attention_forward
    with torch.no_grad():
        base = hf_opt(ids).logits
        try:  # what attention is handed, after the fake quantization
            sdpa_attention.sdpa_attention_forward = lambda m, q, k, v, *a, **kw: (
                seen.setdefault("v", v), real_sdpa(m, q, k, v, *a, **kw))[1]
            handles = C.fake_quantize_kv_cache(hf_opt, CompressionConfig(2, 64, -1))
            q = hf_opt(ids).logits
        finally:
            sdpa_attention.sdpa_attention_forward = real_sdpa
        for h in (raw, *handles):
            h.remove()
        after = hf_opt(ids).logits
    assert torch.isfinite(q).all() and not torch.allclose(q, base)
    assert torch.equal(after, base)  # removed: the model is untouched
    # the values of layer 0 in groups along head_dim (16 < 64: one group), as the engine caches them
    v = seen["raw"].view(2, 20, 4, 16).transpose(1, 2)
    assert torch.equal(seen["v"], C.fake_quantize(v, CompressionConfig(2, 64, -1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for bits in BITS:
        for sym in (False, True):
            cfg = CompressionConfig(bits, 64, 0, sym)
            x = torch.randn(300, 70)
            p, m = C.quantize(x, cfg)
            pc, mc = C.quantize(x.cuda(), cfg)
            assert torch.equal(pc.cpu(), p) and torch.equal(mc.cpu(), m)
            for dt in (torch.float16, torch.float32):
                assert torch.equal(C.dequantize(pc, mc, x.shape, cfg, dt).cpu(),
                                   C.dequantize(p, m, x.shape, cfg, dt))


def test_fp16_meta_rounding_is_directed_and_exact():
    t = torch.cat([torch.randn(2000) * 10.0 ** torch.randint(-9, 4, (2000,)).float(),
                   torch.tensor([0.0, 1.0, -1.0, 2.0 ** -30, -(2.0 ** -30), 1 + 2 ** -12, -1 - 2 ** -12])])
    up, down = C._fp16_toward(t, up=True), C._fp16_toward(t, up=False)
    assert (up >= t).all() and (down <= t).all()
    assert torch.equal(up.half().float(), up) and torch.equal(down.half().float(), down)  # stored exactly
    h = t.half().float()
    assert (up - t <= 2 * (h - t).abs() + 2 * torch.maximum(t.abs() * 2 ** -10, torch.tensor(2.0 ** -24))).all()


def test_out_of_fp16_range_saturates_instead_of_nan():
    x = torch.tensor([[1e6], [-1e6], [3.0], [0.0]]).expand(4, 8).contiguous()
    y = C.fake_quantize(x, CompressionConfig(4, 64, 0))
    assert torch.isfinite(y).all() and y.abs().max() <= 65504 * 16


def test_row_quantized_table_lookup_equals_the_dequantized_table():
    from flexgen_helm.engine.config import Policy
    cfg = Policy().comp_weight_config  # groups along the row (in_features), as the engine stores weights
    table = torch.randn(300, 256) * 0.3
    assert C.RowQuantizedTable.ok(table.shape, cfg) and not C.RowQuantizedTable.ok((300, 64), cfg)
    buf = C.to_buffer(table, cfg)
    rows = C.RowQuantizedTable(buf, table.shape, cfg, torch.float32)
    ids = torch.tensor([[0, 5, 299], [17, 17, 3]])
    assert torch.equal(rows.lookup(ids), torch.nn.functional.embedding(ids, C.fake_quantize(table, cfg)))


def _without_kernels(monkeypatch, fn):
    from flexgen_helm.engine import kernels
    monkeypatch.setenv("FLEXGEN_HELM_NO_KERNELS", "1")
    kernels._library.cache_clear()
    try:
        return fn()
    finally:
        monkeypatch.delenv("FLEXGEN_HELM_NO_KERNELS")
        kernels._library.cache_clear()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_dequantization_is_bit_equal_to_the_torch_ops(monkeypatch, bits, symmetric):
    """The C loop (engine/kernels) and the torch-op fallback give the same bits, across group
    sizes that split packing blocks, padded groups, values spanning 9 decades, fp32 and bf16."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("no C compiler here: only the torch-op path exists")
    torch.manual_seed(bits + 10 * symmetric)
    cases = [((48, 200), 1, 64), ((3, 5, 7, 80), -1, 64), ((16, 128), 1, 32), ((2000, 256), 1, 128),
             ((64, 33), 0, 64), ((5, 40), 1, 16)]
    for shape, gd, gs in cases:
        cfg = CompressionConfig(num_bits=bits, group_size=gs, group_dim=gd, symmetric=symmetric)
        x = torch.randn(shape) * torch.logspace(-6, 3, shape[-1])
        packed, meta = C.quantize(x, cfg)
        for dt in (torch.float32, torch.bfloat16):
            fast = C.dequantize(packed, meta, shape, cfg, dt)
            slow = _without_kernels(monkeypatch, lambda: C.dequantize(packed, meta, shape, cfg, dt))
            assert torch.equal(fast.view(torch.int16 if dt == torch.bfloat16 else torch.int32),
                               slow.view(torch.int16 if dt == torch.bfloat16 else torch.int32)), (shape, gd, dt)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_quantization_is_bit_equal_to_the_torch_ops(monkeypatch, bits, symmetric):
    """The C quantizer writes the torch-op path's bytes (codes and fp16 meta): values over 12 decades,
    beyond fp16's range, fp16 subnormals, ties, constant and all-zero groups; fp32, bf16 and fp16
    inputs; tensors of several blocks split over threads, and a last block that is partly padding."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("no C compiler here: only the torch-op path exists")
    torch.manual_seed(bits + 10 * symmetric)
    cases = [((48, 192), 64), ((3, 5, 2, 2, 64), 64), ((16, 128), 32), ((4096, 256), 128), ((7, 40), 8),
             ((6, 24), 24)]
    for shape, gs in cases:
        cfg = CompressionConfig(num_bits=bits, group_size=gs, group_dim=-1, symmetric=symmetric)
        x = torch.randn(shape) * torch.logspace(-8, 5, shape[-1])
        flat = x.view(-1, gs)
        flat[0] = 3.0                                        # a constant group
        flat[1] = 0.0                                        # all zeros
        flat[2] = torch.arange(gs) * 0.5                     # exact ties on the grid
        flat[3] = torch.randn(gs) * 1e-6                     # fp16 subnormal steps
        flat[-1, 0] = 1e6                                    # beyond fp16: meta saturates
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dt)
            if dt == torch.float16:
                xd = x.clamp(-6e4, 6e4).to(dt)
            fast = C.quantize(xd, cfg)
            slow = _without_kernels(monkeypatch, lambda: C.quantize(xd, cfg))
            assert torch.equal(fast[0], slow[0]), (shape, gs, dt, "codes")
            assert torch.equal(fast[1].view(torch.int16), slow[1].view(torch.int16)), (shape, gs, dt, "meta")


def test_compiled_dequantization_reads_every_fp16_meta_value(monkeypatch):
    """Every finite fp16 step (subnormals included) converts like torch's half -> float."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("no C compiler here")
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[torch.isfinite(h)].contiguous()
    cfg = CompressionConfig(num_bits=8, group_size=8, group_dim=-1, symmetric=True)
    packed = torch.full((h.numel() * 8,), 200, dtype=torch.uint8)
    fast = C.dequantize(packed, h, (h.numel(), 8), cfg, torch.float32)
    slow = _without_kernels(monkeypatch, lambda: C.dequantize(packed, h, (h.numel(), 8), cfg, torch.float32))
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_kernel_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, capsys):
    from flexgen_helm.engine import kernels
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLEXGEN_HELM_KERNEL_DIR", str(tmp_path / "k"))
    kernels._library.cache_clear()
    try:
        cfg = CompressionConfig()
        x = torch.randn(64, 128)
        packed, meta = C.quantize(x, cfg)
        y = C.dequantize(packed, meta, x.shape, cfg, torch.float32)
        assert (y - x).abs().max() <= (x.max() - x.min()) / 15
        assert not kernels.available()
        assert "torch-op path" in capsys.readouterr().err
    finally:
        kernels._library.cache_clear()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_transposed_equals_dequantize_then_permute(bits):
    """KV rows (n, 2, b, H, d) dequantized straight into a head-major (2, b, H, cap, d) buffer."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("no C compiler here")
    torch.manual_seed(bits)
    for d, gs in ((64, 64), (128, 64), (32, 64)):
        n, b, heads, cap = 37, 3, 5, 48
        cfg = CompressionConfig(num_bits=bits, group_size=gs, group_dim=-1)
        rows = torch.randn(n, 2, b, heads, d)
        packed, meta = C.quantize(rows, cfg)
        for dt in (torch.float32, torch.bfloat16):
            want = C.dequantize(packed, meta, rows.shape, cfg, dt).permute(1, 2, 3, 0, 4)
            buf = torch.full((2, b + 2, heads, cap, d), float("nan"), dtype=dt)
            out = buf[:, :b, :, :n]
            assert C.dequantize_transposed(packed, meta, out, (3, 0, 1, 2), cfg)
            assert torch.equal(out, want)
            assert torch.isnan(buf[:, b:]).all() and torch.isnan(buf[:, :b, :, n:]).all()  # nothing else written


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (2, False), (8, True)])
def test_attention_read_from_the_compressed_cache_equals_dequantize_then_sdpa(request, bits, symmetric):
    """The C decode attention over a compressed KV prefix gives SDPA's output on the dequantized
    prefix: MHA and GQA (up to 10 query heads per KV head), head_dim of one group, two groups and less
    than a group, left padding, a sliding window, fp32 and bf16."""
    from flexgen_helm.engine import kernels
    from flexgen_helm.engine.layers import decode_attention
    if not kernels.available():
        pytest.skip("no C compiler here")
    torch.manual_seed(bits)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for (B, H, Hq, D, n, window) in ((3, 4, 4, 64, 37, None), (2, 2, 8, 128, 50, None), (2, 4, 8, 32, 20, 9),
                                     (1, 2, 2, 64, 1, None), (2, 3, 6, 32, 5, None),
                                     # MHA with 64-groups (keys 4 positions at a time, values in registers),
                                     # two groups, a window
                                     (2, 4, 4, 128, 33, None), (2, 4, 4, 64, 40, 7),
                                     # GQA with 64-groups: 3, 5, 6, 7 and 10 query heads per KV head (the
                                     # values' pass tiles heads by 8), a window, n not a multiple of 4
                                     (1, 4, 12, 64, 66, None), (2, 2, 10, 64, 18, None), (2, 2, 12, 64, 9, None),
                                     (2, 2, 14, 64, 29, 11), (2, 2, 20, 128, 43, None),
                                     (8, 8, 8, 64, 130, None)):  # the last: big enough to split over threads
        cfg = CompressionConfig(num_bits=bits, group_size=64, group_dim=-1, symmetric=symmetric)
        g = min(64, D)
        rows = torch.randn(n, 2, B, H, D)
        packed, meta = C.quantize(rows, cfg)
        mask = torch.ones(B, n + 1, dtype=torch.bool)
        mask[0, :min(5, n)] = False  # left padding of the first sequence
        for dt, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            deq = C.dequantize(packed, meta, rows.shape, cfg, dt)
            q, nk, nv = (torch.randn(B, h, 1, D).to(dt) for h in (Hq, H, H))
            k_all = torch.cat([deq[:, 0].permute(1, 2, 0, 3), nk], 2)
            v_all = torch.cat([deq[:, 1].permute(1, 2, 0, 3), nv], 2)
            want = decode_attention(q, k_all, v_all, mask, window)
            allowed = mask.clone()
            if window is not None:
                allowed[:, :n + 1 - window] = False
            got = kernels.attend_compressed(packed, meta, n, q, nk, nv, allowed, bits, C._BLOCK[bits][0],
                                            C._BLOCK[bits][1], g, symmetric)
            if B * H * D % C._BLOCK[bits][0]:  # a position's keys would not start on a packing block
                assert got is None
                continue
            assert got is not None and got.dtype == dt and got.shape == want.shape
            assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (B, H, Hq, D, n, dt)


def test_attention_read_from_a_dense_cache_equals_sdpa(request):
    """The C decode attention over a dense cache (layers.decode_attention's CPU path) gives SDPA's
    output: MHA and GQA (up to 10 query heads per KV head), 64- and 128-wide heads, prefixes of a
    larger cache buffer, left padding, a sliding window, fp32 and bf16; heads it cannot take (not a
    multiple of 64 wide) are left to SDPA."""
    from flexgen_helm.engine import kernels, layers
    if not kernels.available():
        pytest.skip("no C compiler here")
    if not {"avx2", "fma"} <= set(kernels._cpu_flags().split()):
        pytest.skip("no AVX2 + FMA here: the loop declines and SDPA runs")
    torch.manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for (B, H, Hq, D, n, cap) in ((3, 4, 4, 64, 37, 40), (2, 2, 14, 64, 29, 33), (2, 2, 20, 128, 43, 43),
                                  (1, 1, 1, 64, 1, 3), (1, 3, 9, 64, 6, 8),
                                  (8, 8, 32, 64, 130, 140)):  # the last: big enough to split over threads
        for dt, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
            buf = torch.randn(2, B, H, cap, D).to(dt)
            k, v = buf[0, :, :, :n], buf[1, :, :, :n]
            q = torch.randn(B, Hq, 1, D).to(dt)
            mask = torch.ones(B, n, dtype=torch.bool)
            mask[0, :min(5, n - 1)] = False  # left padding of the first sequence
            for window in (None, 7):
                allowed = layers.window_mask(mask, window)
                want = layers._sdpa(q.float(), k.float(), v.float(), allowed[:, None, None, :])
                got = kernels.attend_dense(q, k, v, allowed)
                assert got is not None and got.dtype == dt and got.shape == want.shape
                assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (B, H, Hq, D, n, dt, window)
                assert torch.equal(layers.decode_attention(q, k, v, mask, window), got)
    q, kv = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 2, 9, 32)
    assert kernels.attend_dense(q, kv[0], kv[1], torch.ones(2, 9, dtype=torch.bool)) is None


def test_compiled_int4_matmul_equals_dequantize_then_matmul(monkeypatch):
    """x @ w.T read straight from 4-bit codes: row counts around the 4-row tiles, groups of 64 and
    128, fp32 and bf16 activations, leading batch axes, a call split over threads; and the same
    answer through the dequantizing fallback."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("no C compiler here: only the dequantizing path exists")
    torch.manual_seed(3)
    for (n, k), gs in (((256, 384), 64), ((48, 256), 128), ((4096, 512), 64)):
        cfg = CompressionConfig(num_bits=4, group_size=gs, group_dim=1)
        w = torch.randn(n, k) * torch.logspace(-3, 1, k)
        wq = C.GroupInt4Weight.from_dense(w, cfg, torch.float32)
        ref_w = C.dequantize(wq.packed, wq.meta, (n, k), cfg, torch.float32)
        for rows in (1, 2, 3, 4, 5, 8, 9):
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k).to(dt)
                want = x.float() @ ref_w.T
                got = wq.matmul(x)
                assert got.dtype == dt and got.shape == (rows, n)
                tol = 1e-4 if dt == torch.float32 else 1e-2
                assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (n, k, rows)
        x3 = torch.randn(2, 3, k)
        assert torch.allclose(wq.matmul(x3), x3 @ ref_w.T, rtol=1e-4, atol=1e-3)
        slow = _without_kernels(monkeypatch, lambda: wq.matmul(x3))
        assert torch.allclose(slow, x3 @ ref_w.T, rtol=1e-4, atol=1e-3)
    assert not C.GroupInt4Weight.ok((64, 96), CompressionConfig(group_dim=1))       # K not a multiple of 128
    assert not C.GroupInt4Weight.ok((64, 128), CompressionConfig(group_dim=1, group_size=32))
    assert not C.GroupInt4Weight.ok((64, 128), CompressionConfig(group_dim=1, symmetric=True))


def test_int4_matmul_on_bf16_activations_is_within_its_fixed_point_bound(monkeypatch):
    """bf16 activations go through the 16-bit fixed-point loop: per 64 values a power-of-two scale,
    so values within 2^7 of the group's largest are exact and smaller ones move by at most 2^(e-16)
    (max |x| < 2^e). The product must stay within that bound plus the output's bf16 rounding, with
    activations spanning 2^-30..2^6 inside each group, all-zero groups, 1-9 rows (those below
    kernels.int4_dq_min_rows where the build has that path), K up to 8320 and groups of 192; and
    equal the fp32 loop's answer where the build has no such loop."""
    from flexgen_helm.engine import kernels
    if not kernels.available() or not kernels._library().fg_int4_x16():
        pytest.skip("no compiled AVX2 loop here")
    dq = kernels.int4_dq_min_rows()
    torch.manual_seed(11)
    for (n, k), gs in (((96, 384), 64), ((40, 256), 128), ((520, 1152), 64), ((24, 8320), 64), ((20, 4992), 192)):
        cfg = CompressionConfig(num_bits=4, group_size=gs, group_dim=1)
        assert C.GroupInt4Weight.ok((n, k), cfg)
        wq = C.GroupInt4Weight.from_dense(torch.randn(n, k) * torch.logspace(-2, 1, k), cfg, torch.bfloat16)
        ref_w = C.dequantize(wq.packed, wq.meta, (n, k), cfg, torch.float32)
        for rows in [r for r in (1, 2, 3, 4, 5, 9) if not dq or r < dq]:
            x = (torch.randn(rows, k) * 2.0 ** torch.randint(-30, 6, (rows, k)).float()).bfloat16()
            x[0, 64:128] = 0  # a group with nothing in it
            want = x.float() @ ref_w.T
            got = wq.matmul(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            e = torch.frexp(x.float().view(rows, -1, 64).abs().amax(-1))[1].float()  # max |x| < 2^e
            step = (2.0 ** (e - 16)).repeat_interleave(64, dim=-1)
            bound = step @ ref_w.abs().T + want.abs() * 2 ** -8 + 1e-6 * (x.float().abs() @ ref_w.abs().T)
            assert ((got.float() - want).abs() <= bound).all(), (n, k, rows)
    monkeypatch.setattr(kernels._library(), "fg_int4_x16", lambda: 0)
    x = torch.randn(3, 384).bfloat16()
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=1)
    wq = C.GroupInt4Weight.from_dense(torch.randn(96, 384), cfg, torch.bfloat16)
    ref = x.float() @ C.dequantize(wq.packed, wq.meta, (96, 384), cfg, torch.float32).T
    assert torch.allclose(wq.matmul(x).float(), ref, rtol=2 ** -7, atol=1e-3)


def test_int4_matmul_of_several_bf16_rows_multiplies_the_weights_rounded_to_bf16():
    """Where the build has it (AVX512-BF16), int4_matmul takes kernels.int4_dq_min_rows rows and more
    through bf16 blocks of the weight: the product equals x @ w.T with each dequantized weight rounded
    once to bf16, fp32 sums and the output rounded once. Row counts around the tiles and the 512-row
    chunks, weight rows around the 32-row blocks, K in slices and whole, groups of 64, 128 and 192,
    a stacked weight of three parts."""
    from flexgen_helm.engine import kernels
    dq = kernels.int4_dq_min_rows() if kernels.available() else 0
    if not dq:
        pytest.skip("no bf16-block path in this build (needs AVX512-BF16)")
    torch.manual_seed(14)
    for sizes, k, gs in (((96,), 384, 64), ((40, 8, 19), 256, 128), ((33,), 8192, 64), ((20,), 4992, 192)):
        cfg = CompressionConfig(num_bits=4, group_size=gs, group_dim=1)
        parts = [C.GroupInt4Weight.from_dense(torch.randn(n, k) * torch.logspace(-2, 1, k), cfg, torch.bfloat16)
                 for n in sizes]
        wq = C.GroupInt4Weight.stacked(parts) if len(parts) > 1 else parts[0]
        n = wq.shape[0]
        w_b = wq.dequantize_rows_into(0, n, torch.empty(n, k)).bfloat16().float()
        for rows in (dq, dq + 1, 13, 36, 515):
            x = (torch.randn(rows, k) * 2.0 ** torch.randint(-8, 4, (rows, k)).float()).bfloat16()
            got = wq.matmul(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            want = x.float() @ w_b.T
            bound = want.abs() * 2 ** -8 + 1e-5 * (x.float().abs() @ w_b.abs().T)
            assert ((got.float() - want).abs() <= bound).all(), (sizes, k, gs, rows)


def test_stacked_int4_weights_equal_one_weight_of_their_rows():
    """Weights stacked along out (q, k, v of unequal rows) multiply as the concatenation of their
    dequantized rows: one call in bf16 and fp32, few and many rows (loop, and dequantized blocks that
    straddle parts), with a bias; weights of other in-features do not stack."""
    from flexgen_helm.engine import kernels, layers
    if not kernels.available():
        pytest.skip("needs the compiled kernels (a C compiler)")
    torch.manual_seed(12)
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=1)
    parts = [C.GroupInt4Weight.from_dense(torch.randn(r, 256), cfg, torch.float32) for r in (96, 40, 72)]
    st = C.GroupInt4Weight.stacked(parts)
    assert st.shape == (208, 256)
    ref_w = torch.cat([C.dequantize(p.packed, p.meta, p.shape, cfg, torch.float32) for p in parts])
    bias = torch.randn(208)
    for dt in (torch.float32, torch.bfloat16):
        for rows in (1, 3, layers.int4_loop_max_rows(dt) + 5):
            x = torch.randn(rows, 256).to(dt)
            want = x.float() @ ref_w.T + bias.to(dt).float()
            got = layers.linear(x, st, bias.to(dt))
            tol = 1e-4 if dt == torch.float32 else 2 ** -7
            assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (dt, rows)
    other = C.GroupInt4Weight.from_dense(torch.randn(8, 384), cfg, torch.float32)
    assert C.GroupInt4Weight.stacked([parts[0], other]) is None


def test_int4_k_slices_cut_k_into_whole_blocks_and_groups():
    """GroupInt4Weight's K slices: whole rows below 8192 in-features; from there a slice of 2048-4096
    values that cuts K into whole 128-value blocks and groups, else the shortest longer one."""
    for k, g, want in ((4096, 64, 4096), (8064, 64, 8064), (8192, 64, 4096), (8192, 256, 4096),
                       (14336, 64, 3584), (28672, 128, 4096), (11008, 64, 5504), (12288, 192, 3072),
                       (8320, 64, 8320), (16384, 64, 4096)):
        assert C.int4_k_slice(k, g) == want, (k, g)
    for k in range(128, 40000, 128):
        for g in (64, 128, 192, 256):
            if k % g == 0:
                ks = C.int4_k_slice(k, g)
                assert k % ks == 0 and ks % 128 == 0 and ks % g == 0, (k, g, ks)
                assert ks == k if k < 8192 else 2048 <= ks, (k, g, ks)


def test_int4_weights_in_k_slices_equal_the_quantize_dequantize_reference(monkeypatch):
    """From 8192 in-features GroupInt4Weight stores its codes slice-major: slice s of row n holds the
    quantization of w[n, s ks:(s + 1) ks], in the same bytes as whole rows. Dequantized rows (a range
    across the parts of a stacked weight), the fp32 and bf16 loops at 1-9 rows and the dequantizing
    fallback all equal the quantize-dequantize reference of the dense weight."""
    from flexgen_helm.engine import kernels
    torch.manual_seed(13)
    cfg = CompressionConfig(num_bits=4, group_size=64, group_dim=1)
    k = 14336
    ws = [torch.randn(r, k) * torch.logspace(-2, 1, k) for r in (24, 9)]
    parts = [C.GroupInt4Weight.from_dense(w, cfg, torch.float32) for w in ws]
    ks = parts[0].ks
    assert ks == 3584
    packed, meta = C.quantize(ws[0][5:6, 2 * ks:3 * ks], cfg)
    row = 2 * 24 + 5  # slice 2 of row 5, slice-major
    assert torch.equal(parts[0].packed[row * ks // 2:(row + 1) * ks // 2], packed)
    assert torch.equal(parts[0].meta[row * ks // 32:(row + 1) * ks // 32], meta)
    assert parts[0].packed.numel() + 2 * parts[0].meta.numel() == C.compressed_nbytes((24, k), cfg)
    st = C.GroupInt4Weight.stacked(parts)
    ref = torch.cat([C.fake_quantize(w, cfg) for w in ws])
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(st.dequantize_rows_into(20, 30, torch.empty(10, k, dtype=dt)), ref[20:30].to(dt))
        assert torch.equal(parts[1].dequantize_rows_into(0, 9, torch.empty(9, k, dtype=dt)), ref[24:].to(dt))
    x3 = torch.randn(2, 3, k)
    want3 = x3 @ ref.T
    slow = _without_kernels(monkeypatch, lambda: st.matmul(x3))
    assert torch.allclose(slow, want3, rtol=1e-4, atol=1e-3 * want3.abs().max().item())
    if not kernels.available():
        return
    for dt in (torch.float32, torch.bfloat16):
        for rows in (1, 2, 4, 5, 9):
            x = torch.randn(rows, k).to(dt)
            want = x.float() @ ref.T
            got = st.matmul(x)
            assert got.dtype == dt and got.shape == (rows, 33)
            tol = 1e-4 if dt == torch.float32 else 2 ** -7
            assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (dt, rows)


def test_few_row_bf16_linear_takes_the_loop_with_hardware_bf16_but_not_amx(monkeypatch):
    """With AVX512-BF16 and no AMX, bf16 products of up to BF16_DP_MAX_ROWS_NATIVE rows go through
    the compiled vdpbf16ps loop (1.1-1.7x torch's kernel there on a Zen 4 box), a build without that
    loop takes only one-row products (the widening loop), and either equals the fp32 product
    rounded once; more rows, or AMX, stay on torch's kernel."""
    from flexgen_helm.engine import kernels, layers
    if not kernels.available():
        pytest.skip("needs the compiled kernels (a C compiler)")
    monkeypatch.setattr(layers, "bf16_emulated", lambda: False)
    monkeypatch.setattr(layers, "cpu_amx", lambda: False)
    took, real = [], kernels.bf16_matmul
    monkeypatch.setattr(kernels, "bf16_matmul", lambda *a: took.append(real(*a)) or took[-1])
    torch.manual_seed(6)
    w, bias = torch.randn(256, 384).bfloat16(), torch.randn(256).bfloat16()
    most = layers.BF16_DP_MAX_ROWS_NATIVE
    for dp in (True, False):
        monkeypatch.setattr(kernels, "bf16_dp", lambda dp=dp: dp and kernels._library().fg_bf16_dp() == 1)
        limit = most if kernels.bf16_dp() else 1
        for x in (torch.randn(1, 384).bfloat16(), torch.randn(1, 1, 384).bfloat16(), torch.randn(4, 384).bfloat16(),
                  torch.randn(2, most // 2, 384).bfloat16(), torch.randn(most + 1, 384).bfloat16()):
            took.clear()
            got = layers.linear(x, w, bias)
            ref = x.float() @ w.float().T + bias.float()
            assert got.dtype == torch.bfloat16 and got.shape == ref.shape
            assert torch.allclose(got.float(), ref, rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item())
            assert len(took) == 1 and (took[0] is not None) == (x.numel() // 384 <= limit), (dp, x.shape)
    monkeypatch.setattr(layers, "cpu_amx", lambda: True)
    took.clear()
    layers.linear(torch.randn(1, 384).bfloat16(), w)
    assert took == []


def test_bf16_dot_product_loop_equals_the_fp32_product_rounded_once():
    """The vdpbf16ps loop (built where the CPU has AVX512-BF16) over row counts across its tile
    heights and its one-row-at-a-time switch, weight rows not a multiple of its tiles or blocks, and
    K from 32 to 8192: bf16 out, within one rounding of the fp32 product (only the summation order
    differs); K not a multiple of 32 is refused (None)."""
    from flexgen_helm.engine import kernels
    if not kernels.bf16_dp():
        pytest.skip("needs the compiled kernels built with AVX512-BF16")
    torch.manual_seed(7)
    for n, k in ((37, 32), (16, 8192), (200, 96), (1027, 2048)):
        w = (torch.randn(n, k) * torch.logspace(-2, 1, k)).bfloat16()
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 17, 31, 32, 33):
            x = torch.randn(rows, k).bfloat16()
            got = kernels.bf16_matmul(w, x, 64)
            want = x.float() @ w.float().T
            assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, n)
            scale = (x.float().abs() @ w.float().abs().T)  # bounds each sum's rounding error
            assert ((got.float() - want).abs() <= 2 ** -8 * want.abs() + 1e-6 * scale + 1e-30).all(), (n, k, rows)
    assert kernels.bf16_matmul(torch.randn(8, 48).bfloat16(), torch.randn(2, 48).bfloat16(), 64) is None


def test_bf16_linear_where_bf16_is_emulated_equals_the_widened_fp32_product(monkeypatch):
    """Where the CPU emulates bf16, layers.linear multiplies bf16 weights by the compiled loop (few
    rows) or widens them for torch's fp32 matmul (many rows): both equal the fp32 product of the
    exact widened values, rounded once to bf16, with bias; shapes the loop refuses (K not a multiple
    of 32, a non-contiguous weight) and a missing compiler take the widened path."""
    from flexgen_helm.engine import kernels, layers
    monkeypatch.setattr(layers, "bf16_emulated", lambda: True)
    torch.manual_seed(5)
    for (n, k) in ((256, 384), (48, 96), (40, 80), (4096, 64)):
        w = (torch.randn(n, k) * torch.logspace(-2, 1, k)).bfloat16()
        bias = torch.randn(n).bfloat16()
        for rows in (1, 2, 3, 4, 5, 9, layers.BF16_LOOP_MAX_ROWS, layers.BF16_LOOP_MAX_ROWS + 1, 300):
            x = torch.randn(rows, k).bfloat16()
            want = x.float() @ w.float().T
            for b in (None, bias):
                got = layers.linear(x, w, b)
                ref = want + b.float() if b is not None else want
                assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
                # one bf16 rounding of the product and one of the bias sum: 2 ulps (2^-7 relative)
                assert torch.allclose(got.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item()), (n, k, rows)
        if kernels.available() and k % 32 == 0:  # the loop itself took the few-row calls
            assert kernels.bf16_matmul(w, x[:4], layers.BF16_LOOP_MAX_ROWS) is not None
        assert kernels.bf16_matmul(w, x, 4) is None  # beyond max_rows: the caller widens
    monkeypatch.setattr(layers, "WIDEN_CHUNK", 96 * 7)  # the widened weight in blocks of 7 rows
    w, x = torch.randn(40, 96).bfloat16(), torch.randn(2, 60, 96).bfloat16()
    assert torch.allclose(layers.linear(x, w).float(), x.float() @ w.float().T, rtol=2 ** -7, atol=0.05)
    x3 = torch.randn(2, 3, 384).bfloat16()
    wt = torch.randn(384, 200).bfloat16().T  # non-contiguous (200, 384)
    assert torch.allclose(layers.linear(x3, wt).float(), x3.float() @ wt.float().T, rtol=1e-2, atol=0.1)
    w = torch.randn(64, 128).bfloat16()
    slow = _without_kernels(monkeypatch, lambda: layers.linear(x3[..., :128], w))
    assert torch.allclose(slow.float(), x3[..., :128].float() @ w.float().T, rtol=1e-2, atol=0.1)


def test_int4_linear_with_many_rows_dequantizes_rows_blockwise_and_equals_the_loop(monkeypatch):
    """layers.linear runs a compiled-loop 4-bit weight (GroupInt4Weight) on the loop up to
    int4_loop_max_rows(dtype) rows and beyond that dequantizes it a block of output rows at a time for
    torch's matmul (to fp32; bf16 activations on a CPU with hardware bf16: to bf16): both equal
    x @ dequantize(w).T (fp32 or bf16 activations, bias, batch axes, groups of 64 and 128, blocks of
    rows that do not divide the output rows), on either kind of CPU."""
    from flexgen_helm.engine import kernels, layers
    if not kernels.available():
        pytest.skip("needs the compiled kernels (a C compiler)")
    torch.manual_seed(6)
    calls, whole = [], layers.WIDEN_CHUNK
    real = C.GroupInt4Weight.dequantize_rows_into
    monkeypatch.setattr(C.GroupInt4Weight, "dequantize_rows_into",
                        lambda self, a, b, out: calls.append((a, b, out.dtype)) or real(self, a, b, out))
    for emulated, n, k, g, chunk in ((True, 96, 256, 64, None), (True, 70, 384, 128, 384 * 16),
                                     (False, 96, 256, 64, None), (False, 70, 384, 128, 384 * 16)):
        monkeypatch.setattr(layers, "bf16_emulated", lambda e=emulated: e)
        monkeypatch.setattr(layers, "WIDEN_CHUNK", chunk or whole)  # chunk: blocks of 16 rows: 16+16+16+16+6
        cfg = CompressionConfig(group_dim=1, group_size=g)
        w = torch.randn(n, k) * torch.logspace(-2, 1, k)
        wq = C.GroupInt4Weight.from_dense(w, cfg, torch.float32)
        ref_w = C.dequantize(wq.packed, wq.meta, (n, k), cfg, torch.float32)
        bias = torch.randn(n)
        for dt in (torch.float32, torch.bfloat16):
            limit = layers.int4_loop_max_rows(dt)
            for rows in (limit, limit + 1, 2 * limit + 2):
                calls.clear()
                x = torch.randn(rows, k).to(dt) if rows <= limit + 1 else torch.randn(2, rows // 2, k).to(dt)
                want = x.float() @ ref_w.T + bias.to(dt).float()
                got = layers.linear(x, wq, bias.to(dt))
                assert got.dtype == dt and got.shape == (*x.shape[:-1], n)
                tol = 1e-4 if dt == torch.float32 else 2 ** -7
                assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (n, rows, dt)
                many = rows > limit
                assert bool(calls) == many
                if many:  # every output row dequantized exactly once, in blocks
                    assert sorted(calls)[0][0] == 0 and sorted(calls)[-1][1] == n
                    assert sum(b - a for a, b, _ in calls) == n and len(calls) == (1 if not chunk else 5)
                    wide = torch.bfloat16 if dt == torch.bfloat16 and not emulated else torch.float32
                    assert {d for _, _, d in calls} == {wide}


def test_decode_norm_and_rotation_loops_equal_the_torch_ops(monkeypatch):
    """kernels.rms_norm and kernels.rope (a decode step's per-row operations in one pass) against the
    torch-op path layers.norm and rope.apply_rotary otherwise take: bf16 bit for bit; fp32 rotation bit
    for bit and norm within its last bits (the mean's summation order); inputs that are views (q/k
    norms over a split, heads transposed); odd widths; beyond SMALL_OP_MAX the torch ops."""
    import torch.nn.functional as F

    from flexgen_helm.engine import kernels, rope
    if not kernels.available():
        pytest.skip("needs the compiled kernels (a C compiler)")
    torch.manual_seed(11)

    def torch_norm(x, w, eps):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w

    def torch_rope(x, c, s):
        h = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s

    for dt in (torch.float32, torch.bfloat16):
        fused = (torch.randn(3, 2, 8 * 24 + 2 * 2 * 24) * 4).to(dt)  # rows of a fused q|k|v output
        q = fused[..., :8 * 24].unflatten(-1, (8, 24))  # a view: q's heads, rows not evenly spaced
        for x in (torch.randn(1, 1, 1024).to(dt), torch.randn(5, 7, 33).to(dt) * 100, q):
            w = torch.randn(x.shape[-1]).to(dt)
            got, want = kernels.rms_norm(x, w, 1e-6), torch_norm(x, w, 1e-6)
            assert got is not None and got.dtype == dt and got.shape == x.shape
            if dt == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                assert torch.allclose(got, want, rtol=4e-7, atol=0)
        for B, H, T, D in ((1, 16, 1, 128), (3, 4, 5, 64), (2, 3, 2, 10)):
            x = (torch.randn(B, T, H, D) * 3).to(dt).transpose(1, 2)  # heads transposed, as attention has them
            c, s = torch.randn(B, 1, T, D).to(dt), torch.randn(B, 1, T, D).to(dt)
            got = kernels.rope(x, c, s)
            assert got is not None and torch.equal(got, torch_rope(x, c, s))
            assert torch.equal(rope.apply_rotary(x, c, s), got)
    big = torch.randn(kernels.SMALL_OP_MAX + 64)
    assert kernels.rms_norm(big.view(-1, 64), torch.randn(64), 1e-5) is None  # prefills: torch's threads
    assert kernels.rms_norm(torch.randn(2, 8).half(), torch.randn(8).half(), 1e-5) is None
    assert kernels.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)) is None  # broadcast T


def test_int4_parts_keep_the_call_arguments():
    """A weight's Int4Parts keeps the C call's row count, shape check and pointer arrays after its first
    call (weights on the compute tier keep their objects from step to step): later calls, and the same
    parts as a plain list (computed afresh each call), give identical products; a call with another
    group size is checked afresh, not answered from the cache."""
    from flexgen_helm.engine import kernels
    if not kernels.available():
        pytest.skip("needs the compiled kernels (a C compiler)")
    torch.manual_seed(12)
    cfg = CompressionConfig(4, 64, 1)
    w = C.GroupInt4Weight.stacked([C.GroupInt4Weight.from_dense(torch.randn(n, 256), cfg, torch.bfloat16)
                                   for n in (48, 16, 16)])
    assert isinstance(w.parts, kernels.Int4Parts) and getattr(w.parts, "call_args", None) is None
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 256).to(dt)
        first = kernels.int4_matmul(w.parts, x, 256, 64, 256)
        assert first is not None and w.parts.call_args[0] == 80
        assert torch.equal(kernels.int4_matmul(w.parts, x, 256, 64, 256), first)
        assert torch.equal(kernels.int4_matmul(list(w.parts), x, 256, 64, 256), first)
    assert kernels.int4_matmul(w.parts, torch.randn(1, 256).bfloat16(), 256, 96, 256) is None  # 96: not whole 64s
