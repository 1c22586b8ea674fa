"""KV block packing: every backend is bit-exact against plain torch indexing."""

import numpy as np
import pytest
import torch

from kvmesh.gpu import kv_pack
from kvmesh.gpu.kv_pack import (
    available_backends,
    pack_blocks,
    pack_layer,
    packed_shape,
    unpack_blocks,
    unpack_layer,
)

NUM_LAYERS, NUM_BLOCKS = 3, 8
CPU_BACKENDS = available_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK_LISTS = {
    "random": np.random.default_rng(7).integers(0, NUM_BLOCKS, 6).tolist(),
    "repeated": [3, 3, 1, 3],
    "out_of_order": [7, 6, 5, 4, 3, 2, 1, 0],
    "single": [4],
    "empty": [],
}
# one tensor per layer; layers as views of one tensor (copied in one launch); views of one
# tensor in reverse order (shares storage but is not back to back: per-layer path).
LAYOUTS = ["per_layer", "one_allocation", "one_allocation_reversed"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_pool(
    dtype=torch.float32,
    layout="per_layer",
    num_blocks=NUM_BLOCKS,
    block_size=4,
    num_kv_heads=2,
    head_dim=8,
    num_layers=NUM_LAYERS,
    seed=0,
    device="cpu",
) -> list[torch.Tensor]:
    """Random KV caches, one [2, num_blocks, block_size, heads, dim] tensor per layer."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    pool = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    if layout == "per_layer":
        return [layer.clone() for layer in pool]
    if layout == "one_allocation":
        return list(pool)
    return list(pool.flip(0).contiguous())[::-1]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != 0.0 and NaN payloads count."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def reference_pack(kv_caches, block_ids) -> torch.Tensor:
    return torch.stack([c[:, torch.tensor(block_ids, dtype=torch.long)] for c in kv_caches])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(bits(actual.cpu()), bits(expected.cpu()))


# ---- pack ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ids_name", BLOCK_LISTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_matches_torch_indexing(backend, dtype, ids_name, layout):
    kv_caches = make_pool(dtype, layout)
    ids = BLOCK_LISTS[ids_name]
    packed = pack_blocks(kv_caches, ids, backend=backend)
    assert packed.shape == packed_shape(kv_caches, len(ids))
    assert_same_bits(packed, reference_pack(kv_caches, ids))


@pytest.mark.parametrize(
    "dtype, head_dim, element_offset, word_bytes",
    [
        (torch.bfloat16, 8, 0, 8),
        (torch.bfloat16, 8, 2, 4),  # layers start 4 bytes past an 8-byte boundary
        (torch.float32, 3, 1, 4),  # 96-byte rows
        (torch.float16, 3, 1, 2),  # 48-byte rows starting 2 bytes past a boundary
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_with_narrow_words(backend, dtype, head_dim, element_offset, word_bytes):
    """Row sizes and start addresses that rule out int64 words must still copy exactly."""
    numel = 2 * NUM_BLOCKS * 4 * 2 * head_dim
    base = torch.randn(NUM_LAYERS, numel + 8).to(dtype)  # layer stride: a multiple of 16 B
    kv_caches = [
        row[element_offset : element_offset + numel].view(2, NUM_BLOCKS, 4, 2, head_dim)
        for row in base
    ]
    rows = [c.view(2 * NUM_BLOCKS, -1) for c in kv_caches]
    assert kv_pack._word_bytes(rows, widest=8) == word_bytes
    ids = [5, 0, 5, 2]
    packed = pack_blocks(kv_caches, ids, backend=backend)
    assert_same_bits(packed, reference_pack(kv_caches, ids))
    dst = make_pool(dtype, head_dim=head_dim, seed=3)
    unpack_blocks(packed, dst, [1, 2, 3, 4], backend=backend)
    for layer in range(NUM_LAYERS):
        assert_same_bits(dst[layer][:, [1, 2, 3, 4]], kv_caches[layer][:, ids])


@pytest.mark.parametrize(
    "layout, num_groups",
    [
        ("per_layer", NUM_LAYERS),
        ("one_allocation", 1),
        ("one_allocation_reversed", NUM_LAYERS),
    ],
)
def test_one_allocation_is_copied_as_one_group(layout, num_groups):
    assert len(kv_pack._row_groups(make_pool(layout=layout))) == num_groups


@pytest.mark.parametrize("block_ids", [np.array([6, 1]), torch.tensor([6, 1]), (6, 1)])
def test_pack_accepts_arrays_tensors_and_tuples(block_ids):
    kv_caches = make_pool()
    assert_same_bits(pack_blocks(kv_caches, block_ids), reference_pack(kv_caches, [6, 1]))


def test_auto_picks_numba_on_cpu():
    assert kv_pack._resolve("auto", torch.device("cpu")) == kv_pack._COPIES["numba"]


# ---- unpack --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_then_unpack_into_other_pool(backend, dtype, layout):
    src = make_pool(dtype, layout, seed=1)
    dst = make_pool(dtype, layout, num_blocks=10, seed=2)
    before = [c.clone() for c in dst]
    src_ids, dst_ids = [2, 7, 2, 0], [9, 0, 4, 5]  # a source block may travel twice
    unpack_blocks(pack_blocks(src, src_ids, backend=backend), dst, dst_ids, backend=backend)
    for layer in range(NUM_LAYERS):
        expected = before[layer].clone()
        expected[:, dst_ids] = src[layer][:, src_ids]
        assert_same_bits(dst[layer], expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unpack_empty_changes_nothing(backend):
    dst = make_pool()
    before = [c.clone() for c in dst]
    unpack_blocks(pack_blocks(make_pool(seed=1), []), dst, [], backend=backend)
    for layer, cache in enumerate(dst):
        assert_same_bits(cache, before[layer])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_by_layer_equals_all_layers(backend):
    src, dst = make_pool(torch.bfloat16, seed=1), make_pool(torch.bfloat16, seed=2)
    expected_dst = make_pool(torch.bfloat16, seed=2)
    ids, dst_ids = [1, 6, 3], [0, 2, 7]
    packed = pack_blocks(src, ids, backend=backend)
    buffer = torch.empty_like(packed)
    for layer in range(NUM_LAYERS):
        assert (
            pack_layer(src[layer], ids, out=buffer[layer], backend=backend).data_ptr()
            == buffer[layer].data_ptr()
        )
        unpack_layer(buffer[layer], dst[layer], dst_ids, backend=backend)
    assert_same_bits(buffer, packed)
    unpack_blocks(packed, expected_dst, dst_ids, backend=backend)
    for layer in range(NUM_LAYERS):
        assert_same_bits(dst[layer], expected_dst[layer])


# ---- caller-owned buffers ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_typed_is_written_in_place(backend, dtype):
    kv_caches, ids = make_pool(dtype), [5, 1, 5]
    out = torch.zeros(packed_shape(kv_caches, len(ids)), dtype=dtype)
    packed = pack_blocks(kv_caches, ids, out=out, backend=backend)
    assert packed.data_ptr() == out.data_ptr()
    assert_same_bits(out, reference_pack(kv_caches, ids))


@pytest.mark.parametrize("byte_offset", [0, 2, 6])  # 2 and 6: narrower words than int64
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_flat_bytes_is_written_in_place(backend, dtype, byte_offset):
    kv_caches, ids = make_pool(dtype), [5, 1, 5]
    shape = packed_shape(kv_caches, len(ids))
    nbytes = int(np.prod(shape)) * 2
    arena = torch.zeros(nbytes + 8, dtype=torch.uint8)  # e.g. a shared-memory segment
    out = arena[byte_offset : byte_offset + nbytes]
    packed = pack_blocks(kv_caches, ids, out=out, backend=backend)
    assert packed.data_ptr() == out.data_ptr() and packed.shape == shape
    assert_same_bits(out.view(dtype).view(shape), reference_pack(kv_caches, ids))
    assert not arena[:byte_offset].any() and not arena[byte_offset + nbytes :].any()
    dst = make_pool(dtype, seed=3)
    unpack_blocks(out, dst, [0, 1, 2], backend=backend)
    for layer in range(NUM_LAYERS):
        assert_same_bits(dst[layer][:, [0, 1, 2]], kv_caches[layer][:, ids])


# ---- bad arguments -------------------------------------------------------------------


def pool_with(layer: int, tensor: torch.Tensor) -> list[torch.Tensor]:
    kv_caches = make_pool()
    kv_caches[layer] = tensor
    return kv_caches


BAD_CALLS = {
    "unknown backend": (lambda: pack_blocks(make_pool(), [1], backend="cuda"), "backend must be"),
    "cupy on cpu": (lambda: pack_blocks(make_pool(), [1], backend="cupy"), r"backend .*cupy"),
    "no layers": (lambda: pack_blocks([], [1]), "kv_caches must be a non-empty list"),
    "not a tensor": (lambda: pack_blocks(pool_with(1, np.zeros(3)), [1]), r"kv_caches\[1\]"),
    "4-d layer": (
        lambda: pack_blocks(pool_with(0, torch.zeros(2, 8, 4, 16)), [1]),
        r"kv_caches\[0\] must have shape",
    ),
    "k/v axis not 2": (
        lambda: pack_blocks(pool_with(0, torch.zeros(3, 8, 4, 2, 8)), [1]),
        r"kv_caches\[0\] must have shape",
    ),
    "layer shape differs": (
        lambda: pack_blocks(pool_with(2, torch.zeros(2, 9, 4, 2, 8)), [1]),
        r"kv_caches\[2\] .*must match",
    ),
    "layer dtype differs": (
        lambda: pack_blocks(pool_with(1, torch.zeros(2, 8, 4, 2, 8, dtype=torch.float16)), [1]),
        r"kv_caches\[1\] .*must match",
    ),
    "integer pool": (
        lambda: pack_blocks([torch.zeros(2, 8, 4, 2, 8, dtype=torch.int32)], [1]),
        r"kv_caches\[0\]\.dtype must be one of",
    ),
    "non-contiguous layer": (
        lambda: pack_layer(torch.zeros(2, 8, 4, 8, 2).transpose(3, 4), [1]),
        "kv_cache must be contiguous",
    ),
    "ids out of range": (
        lambda: pack_blocks(make_pool(), [0, 8, -1, 3]),
        r"block_ids out of range \[0, 8\): \[8, -1\]",
    ),
    "ids 2-d": (lambda: pack_blocks(make_pool(), [[1, 2]]), "block_ids must be 1-D"),
    "ids float": (lambda: pack_blocks(make_pool(), [1.0, 2.0]), "block_ids must be integers"),
    "ids repeated on unpack": (
        lambda: unpack_blocks(pack_blocks(make_pool(), [1, 2, 3]), make_pool(), [4, 6, 4]),
        r"block_ids must be distinct to unpack, repeated: \[4\]",
    ),
    "out wrong shape": (
        lambda: pack_blocks(make_pool(), [1, 2], out=torch.empty(3, 2, 3, 4, 2, 8)),
        r"out must be \[3, 2, 2, 4, 2, 8\] torch.float32 or a flat uint8",
    ),
    "out wrong dtype": (
        lambda: pack_blocks(make_pool(), [1], out=torch.empty(3, 2, 1, 4, 2, 8).half()),
        "out must be",
    ),
    "out bytes wrong size": (
        lambda: pack_blocks(make_pool(), [1], out=torch.empty(100, dtype=torch.uint8)),
        "out must hold exactly 1536 bytes, got 100",
    ),
    "out bytes misaligned": (
        lambda: pack_blocks(make_pool(), [1], out=torch.empty(1537, dtype=torch.uint8)[1:]),
        "out must be aligned to 4 bytes",
    ),
    "out not a tensor": (lambda: pack_blocks(make_pool(), [1], out=bytearray(1536)), "out must"),
    "packed wrong shape": (
        lambda: unpack_blocks(pack_blocks(make_pool(), [1, 2]), make_pool(), [1]),
        r"packed must be \[3, 2, 1, 4, 2, 8\]",
    ),
    "negative count": (lambda: packed_shape(make_pool(), -1), "num_blocks_packed must be"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_arguments_raise_value_error_naming_them(name):
    call, message = BAD_CALLS[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_arguments_leave_out_untouched():
    out = torch.zeros(3, 2, 2, 4, 2, 8)
    with pytest.raises(ValueError):
        pack_blocks(make_pool(), [1, 8], out=out)
    assert not out.any()


def test_measure_pack_reports_every_backend():
    from kvmesh.bench.pack import measure_pack

    result = measure_pack(1 << 20, list(CPU_BACKENDS), num_layers=2, repeats=1)
    assert result["nbytes"] == 1 << 20
    assert set(result["pack_gbps"]) == set(result["unpack_gbps"]) == set(CPU_BACKENDS)
    assert min(result["memcpy_gbps"], *result["pack_gbps"].values()) > 0


# ---- CUDA ----------------------------------------------------------------------------


def cuda_backends() -> list[str]:
    return list(available_backends("cuda")) if torch.cuda.is_available() else ["torch", "cupy"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ids_name", BLOCK_LISTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_pack_unpack_match_torch_indexing(backend, dtype, ids_name, layout):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not installed")
    src = make_pool(dtype, layout, seed=1, device="cuda")
    dst = make_pool(dtype, layout, num_blocks=len(BLOCK_LISTS[ids_name]) + 3, seed=2, device="cuda")
    ids = BLOCK_LISTS[ids_name]
    packed = pack_blocks(src, ids, backend=backend)
    assert_same_bits(packed, reference_pack(src, ids))
    dst_ids = list(range(len(ids)))[::-1]
    before = [c.clone() for c in dst]
    unpack_blocks(packed, dst, dst_ids, backend=backend)
    for layer in range(NUM_LAYERS):
        expected = before[layer].clone()
        expected[:, dst_ids] = src[layer][:, ids]
        assert_same_bits(dst[layer], expected)


@pytest.mark.gpu
@cuda
def test_cuda_auto_and_flat_bytes():
    kv_caches, ids = make_pool(torch.bfloat16, device="cuda"), [5, 1, 5]
    nbytes = int(np.prod(packed_shape(kv_caches, len(ids)))) * 2
    out = torch.zeros(nbytes + 2, dtype=torch.uint8, device="cuda")[2:]  # 2-byte words
    pack_blocks(kv_caches, ids, out=out)
    assert_same_bits(
        out.view(torch.bfloat16).view(packed_shape(kv_caches, 3)), reference_pack(kv_caches, ids)
    )
    with pytest.raises(ValueError, match="backend must be"):
        pack_blocks(kv_caches, ids, backend="numba")
