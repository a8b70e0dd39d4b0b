"""The memory bank's coreset selection and nearest-neighbour distances."""
import torch

from anomaly.memory_bank import greedy_coreset, nearest_distance


def test_coreset_covers_every_cluster_and_is_seeded():
    """Farthest-point selection: 8 tight, far-apart clusters of very different sizes each get a
    representative in an 8-vector coreset (a random sample would miss the small ones), and the
    same seed gives the same selection."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 64, generator=g) * 50
    sizes = [5000, 3000, 500, 100, 40, 10, 3, 1]
    vectors = torch.cat([c + torch.randn(n, 64, generator=g) * 0.1 for c, n in zip(centres, sizes)])
    cluster = torch.repeat_interleave(torch.arange(8), torch.tensor(sizes))
    chosen = greedy_coreset(vectors, 8, torch.Generator().manual_seed(1))
    assert chosen.dtype == torch.long and sorted(cluster[chosen].tolist()) == list(range(8))
    assert torch.equal(chosen, greedy_coreset(vectors, 8, torch.Generator().manual_seed(1)))
    assert torch.equal(greedy_coreset(vectors[:6], 8, g), torch.arange(6))


def test_nearest_distance_is_exact_in_blocks():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    expected = torch.cdist(queries, bank).amin(1)
    torch.testing.assert_close(nearest_distance(queries, bank, max_elements=7 * 50), expected, rtol=1e-4, atol=1e-4)


def test_nearest_distance_stays_exact_far_from_the_origin():
    """Features far from the origin (all positive after a ReLU): without centring, |q|^2 and
    |b|^2 would swamp float32's precision of the small distances between them."""
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(300, 16, generator=g) + 1000.0, torch.randn(50, 16, generator=g) + 1000.0
    expected = torch.cdist(queries.double(), bank.double()).amin(1).float()
    torch.testing.assert_close(nearest_distance(queries, bank), expected, rtol=1e-4, atol=1e-4)
