"""search.py: the streaming exact top-k against the dense scores, and the FAISS index, its recall and its cache."""

import json
import os
import sys

import pytest
import torch

from diffusers_attribution import AttributionConfig
from diffusers_attribution.search import IndexCache, ResidentRows, build_index, exact_topk, merge_topk, search
from diffusers_attribution.store.format import FeatureStore


def random_rows(n, d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(5, d, generator=generator)


def split(features, sizes):
    """(start, block) over consecutive blocks of the given sizes (cycled), the last one shorter."""
    blocks, start, i = [], 0, 0
    while start < len(features):
        size = sizes[i % len(sizes)]
        blocks.append((start, features[start : start + size]))
        start, i = start + size, i + 1
    return blocks


def dense_topk(query, features, k, weights=None):
    scores = query.float() @ features.float().T
    if weights is not None:
        scores = scores * weights.float()
    values, indices = scores.topk(min(k, len(features)), dim=1)
    return indices, values


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [1, 10, 40, 237])
def test_exact_topk_matches_dense_across_block_boundaries(weighted, k):
    features, query = random_rows(237, 16)
    weights = torch.rand(237, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    expected_indices, expected_scores = dense_topk(query, features, k, weights)
    for sizes in ([237], [30], [7, 64, 1], [1]):  # one block, k > block size, uneven blocks, single rows
        indices, scores = exact_topk(query.double(), split(features, sizes), k, weights)
        assert indices.dtype == torch.int64 and scores.dtype == torch.float32
        assert indices.shape == (5, k)
        assert torch.equal(indices, expected_indices)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_topk_upcasts_half_blocks(dtype):
    features, query = random_rows(300, 32)
    half = features.to(dtype)
    indices, scores = exact_topk(query, split(half, [64]), 10)
    expected_indices, expected_scores = dense_topk(query, half.float(), 10)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_exact_topk_breaks_ties_by_lower_index():
    """Tied scores are ordered by row: a stable sort of the dense scores, at any block split. (Small integers, so
    that every GEMM sums them exactly: duplicated float rows can differ by an ulp with their position in a GEMM.)"""
    generator = torch.Generator().manual_seed(0)
    base, query = (torch.randint(-3, 4, shape, generator=generator).float() for shape in ((20, 8), (5, 8)))
    features = torch.cat([base, base, base[:5]])  # row i ties with i + 20 (and i + 40 for i < 5)
    dense = query @ features.T
    expected = dense.sort(dim=1, descending=True, stable=True).indices[:, :25]
    for sizes in ([45], [20], [3, 11], [1]):
        indices, _ = exact_topk(query, split(features, sizes), 25)
        assert torch.equal(indices, expected)
    reversed_blocks = split(features, [7])[::-1]  # blocks in any order give the same answer
    assert torch.equal(exact_topk(query, reversed_blocks, 25)[0], expected)


def test_merge_topk_of_disjoint_parts_is_the_whole():
    features, query = random_rows(500, 24)
    weights = torch.rand(500, generator=torch.Generator().manual_seed(2))
    whole = exact_topk(query, split(features, [100]), 12, weights)
    blocks = split(features, [100])
    parts = [exact_topk(query, blocks[i::2], 12, weights) for i in range(2)]
    merged = merge_topk(parts, 12)
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])


def test_exact_topk_over_a_saved_store(tmp_path):
    features, query = random_rows(90, 16)
    metadata = {"num_examples": 90, "example_hashes": [f"{i:016x}" for i in range(90)], "projection": {"kind": "test"},
                "model_fingerprint": "0" * 16}
    FeatureStore(features, AttributionConfig(method="d-trak"), metadata).save_pretrained(tmp_path / "s", shard_rows=40)
    store = FeatureStore.from_pretrained(tmp_path / "s")
    indices, scores = exact_topk(query, store.blocks(block_rows=13), 90)  # k = N, blocks inside shards
    expected_indices, expected_scores = dense_topk(query, features, 90)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_exact_topk_refuses_non_finite_rows_and_queries():
    features, query = random_rows(50, 8)
    features[31, 2] = float("nan")
    with pytest.raises(ValueError, match="rows 20..39"):
        exact_topk(query, split(features, [20]), 5)
    with pytest.raises(ValueError, match="query"):
        exact_topk(query * float("inf"), split(features[:20], [20]), 5)
    weights = torch.ones(50)
    weights[3] = float("inf")
    with pytest.raises(ValueError, match="weights"):
        exact_topk(query, split(features[:20], [20]), 5, weights)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_resident_rows_give_the_exact_top_k(device):
    """ResidentRows: blocks merged into larger ones on the device, weights kept apart: exact_topk's result."""
    features, query = random_rows(300, 16)
    weights = torch.rand(300, generator=torch.Generator().manual_seed(3)) + 0.5
    rows = ResidentRows.load(iter(split(features, [37, 11])), device, weights, block_rows=100)
    starts = [start for start, _ in rows.blocks]
    assert starts == [0] + [start + len(block) for start, block in rows.blocks[:-1]] and rows.num_rows == 300
    assert len(rows.blocks) == 3 and all(len(block) >= 100 for _, block in rows.blocks[:-1])
    assert all(block.device.type == device for _, block in rows.blocks)
    indices, scores = rows.topk(query, 12)
    expected_indices, expected_scores = exact_topk(query, split(features, [37, 11]), 12, weights)
    assert indices.device.type == "cpu" and torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FAISS


def clustered_rows(n, d, seed=0, clusters=200):
    """Rows around 200 seeded centres (features of real data cluster; pure noise is the worst case for IVF);
    `seed` draws which centre and the noise."""
    centres = torch.randn(clusters, d, generator=torch.Generator().manual_seed(12345))
    generator = torch.Generator().manual_seed(seed)
    rows = centres[torch.randint(clusters, (n,), generator=generator)] + 0.5 * torch.randn(n, d, generator=generator)
    return rows


def recall_at_10(found, truth):
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.numel()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_recall_at_10_against_exact(kind):
    pytest.importorskip("faiss")
    features = clustered_rows(20_000, 64)
    weights = torch.rand(20_000, generator=torch.Generator().manual_seed(3)) + 0.5
    blocks = split(features, [4096])
    index = build_index(blocks, 64, 20_000, weights, kind=kind)
    assert index.kind == kind and index.recall is not None and index.recall >= 0.95
    queries = clustered_rows(100, 64, seed=7)  # new queries from the same distribution, not rows
    truth_indices, truth_scores = exact_topk(queries, blocks, 10, weights)
    indices, scores = search(index, queries, 10)
    assert recall_at_10(indices, truth_indices) >= 0.95
    exact = torch.einsum("nd,nkd->nk", queries, features[indices]) * weights[indices]
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-4)  # the scores of the returned rows are exact


def test_index_tuned_for_mapped_queries():
    """Queries q' = φ(q)(C + λI)⁻¹ are not distributed like the rows: with query_map the search parameter is tuned
    on held-out rows × the map, and the recall holds for such queries."""
    pytest.importorskip("faiss")
    features = clustered_rows(20_000, 32)
    gram = features.double().T @ features.double()
    inverse = torch.linalg.inv(gram + 1e-3 * gram.trace() / 32 * torch.eye(32, dtype=torch.float64))
    blocks = split(features, [5000])
    index = build_index(blocks, 32, 20_000, kind="ivf", query_map=inverse)
    assert index.recall >= 0.95
    queries = (clustered_rows(100, 32, seed=9).double() @ inverse).float()
    truth = exact_topk(queries, blocks, 10)[0]
    assert recall_at_10(search(index, queries, 10)[0], truth) >= 0.95
    tuned = build_index(blocks, 32, 20_000, kind="ivf", tuning_queries=queries)  # real queries: tune on 50, measure on 50
    assert tuned.recall_queries == 50 and tuned.recall >= 0.95
    assert recall_at_10(search(tuned, queries[50:], 10)[0], truth[50:]) == pytest.approx(tuned.recall)


def test_index_cache_is_keyed_by_digests_and_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    import diffusers_attribution.search as search_module

    features = clustered_rows(3000, 16)
    blocks = split(features, [1000])
    cache = IndexCache(tmp_path / "cache")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b))[1])
    first = cache.get_or_build(["a" * 64], blocks, 16, 3000)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = IndexCache.key(["a" * 64], None, "flat", {}, seed=0, target_recall=0.95, recall_queries=200,
                         num_rows=3000, dim=16, query_map=None, tuning_queries=None)
    rows_key = IndexCache.key(["a" * 64], None, "latest", num_rows=3000, dim=16)
    assert files == sorted([f"{key}.faiss", f"{key}.json", f"{rows_key}.latest"])  # no temporaries left behind
    assert {os.path.basename(b) for _, b in replaced} == set(files)
    assert all(os.path.dirname(a) == os.path.dirname(b) and os.path.basename(a).startswith(".") for a, b in replaced)
    assert json.loads((tmp_path / "cache" / f"{key}.json").read_text())["kind"] == "flat"

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an index that is in the cache")

    monkeypatch.setattr(search_module, "build_index", no_build)
    again = cache.get_or_build(["a" * 64], blocks, 16, 3000)  # same digests: read from the cache
    assert again.index.ntotal == 3000 and again.recall == first.recall
    with pytest.raises(AssertionError, match="rebuilt"):  # other digests, or weights: not reused
        cache.get_or_build(["b" * 64], blocks, 16, 3000)
    with pytest.raises(AssertionError, match="rebuilt"):
        cache.get_or_build(["a" * 64], blocks, 16, 3000, torch.ones(3000))
    monkeypatch.undo()
    other = cache.get_or_build(["b" * 64], blocks, 16, 3000)
    assert other.index.ntotal == 3000 and len(list((tmp_path / "cache").glob("*.faiss"))) == 2


def test_a_session_finds_the_index_built_last_whatever_its_kind(tmp_path):
    """`get_or_build(build=False, latest=True)` (a session's lookup): the index built last for the same rows and
    weights, of any kind or parameters; none for other rows; a pointer naming no cached index, or garbage, is none."""
    pytest.importorskip("faiss")
    features = clustered_rows(3000, 16)
    blocks = split(features, [1000])
    cache = IndexCache(tmp_path / "cache")
    assert cache.get_or_build(["a" * 64], blocks, 16, 3000, build=False, latest=True) is None
    built = cache.get_or_build(["a" * 64], blocks, 16, 3000, kind="hnsw")
    assert cache.get_or_build(["a" * 64], blocks, 16, 3000, build=False) is None  # the default kind: not built
    found = cache.get_or_build(["a" * 64], blocks, 16, 3000, build=False, latest=True)
    assert found.kind == "hnsw" and found.params == built.params and found.index.ntotal == 3000
    assert cache.get_or_build(["b" * 64], blocks, 16, 3000, build=False, latest=True) is None
    assert cache.get_or_build(["a" * 64], blocks, 16, 3000, torch.ones(3000), build=False, latest=True) is None
    (pointer,) = (tmp_path / "cache").glob("*.latest")
    pointer.write_text("../" + "0" * 61)
    assert cache.get_or_build(["a" * 64], blocks, 16, 3000, build=False, latest=True) is None


def test_index_cache_path_is_the_key_only(tmp_path):
    cache = IndexCache(tmp_path)
    with pytest.raises(ValueError):
        cache.path("../../etc/passwd")
    assert cache.path("0" * 64).parent == tmp_path


def test_missing_faiss_names_the_extra(monkeypatch):
    from diffusers_attribution.search import import_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"diffusers-attribution\[index\]"):
        import_faiss()
