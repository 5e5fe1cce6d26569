"""
The KV cache as a data structure (nanochat test_engine style): which frames it holds after
every block, that the slots hold those frames' values, repeats overwrite, snapshot/expand
make independent copies, and bad settings fail with a clear message.

Run:  python -m pytest tests/test_kvcache.py -q
"""

import pytest
import torch

from kvcache import KVCache, check_window, visible

TPF, LAYERS, HEADS, D = 2, 2, 1, 4


def write_block(cache, start, n, value_of=lambda f: float(f)):
    """One model call's worth of writes: frame f's tokens get the value value_of(f)."""
    lo, hi = cache.begin(start, n)
    B = cache.k.shape[1]
    vals = torch.tensor([value_of(f) for f in range(start, start + n)]).repeat_interleave(TPF)
    kv = vals.view(1, -1, 1, 1).expand(B, -1, HEADS, D)
    for i in range(LAYERS):
        cache.write(i, lo, kv + i, -kv)
    return lo, hi


def held(cache):
    """Frame index stored in each valid slot, read back from the K values of layer 0."""
    return cache.layer(0)[0][0, ::TPF, 0, 0].long().tolist()


@pytest.mark.parametrize("n,local,sink", [(3, -1, 0), (3, 9, 3), (3, 12, 3), (3, 10, 2), (3, 11, 5),
                                          (2, 7, 1), (1, 4, 2), (3, 6, 0)])
def test_holds_exactly_the_visible_frames(n, local, sink):
    F = 30
    cache = KVCache(LAYERS, 2, F, TPF, HEADS, D, sink=sink, local=local)
    for a in range(0, F, n):
        for _ in range(4):  # 4 denoising calls + ... all on the same slots
            write_block(cache, a, n, lambda f: -1.0)
        write_block(cache, a, n)  # the clean pass overwrites them
        e = a + n
        expect = [f for f in range(e) if visible(f, e, sink, local)]
        assert cache.frames == expect
        assert held(cache) == expect, "slot contents follow the frame list"
        assert cache.length == len(expect) * TPF
        assert cache.layer(1)[0][0, ::TPF, 0, 0].long().tolist() == [f + 1 for f in expect]
        assert cache.end_frame == e
    if local > 0:
        assert cache.capacity == local


def test_repeat_call_does_not_evict_or_move():
    cache = KVCache(LAYERS, 1, 9, TPF, HEADS, D, sink=3, local=9)
    for a in (0, 3, 6, 9):
        write_block(cache, a, 3)
    before = list(cache.frames)
    assert write_block(cache, 9, 3) == (12, 18)  # same slots as the first call on block 9
    assert cache.frames == before


def test_stacked_copies_are_independent():
    cache = KVCache(LAYERS, 2, 12, TPF, HEADS, D, sink=3, local=9)
    for a in (0, 3, 6):
        write_block(cache, a, 3, lambda f: f + 0.5)
    cache.cross[0] = (torch.randn(2, 5, HEADS, D), torch.randn(2, 5, HEADS, D))
    snap = cache.select([0, 1])
    big = cache.select([0, 1] * 3)  # rows (b0, b1, b0, b1, b0, b1)
    assert big.k.shape[1] == 6 and big.frames == cache.frames
    for r in range(6):
        assert torch.equal(big.k[:, r], cache.k[:, r % 2])
        assert torch.equal(big.cross[0][0][r], cache.cross[0][0][r % 2])
    # branch: every candidate continues on its own; nobody else sees it
    write_block(big, 9, 3, lambda f: 100.0)
    big.k[:, 0] += 7
    assert cache.frames == [0, 1, 2, 3, 4, 5, 6, 7, 8] and snap.frames == cache.frames
    assert torch.equal(snap.k, cache.k) and torch.equal(snap.v, cache.v)
    assert not torch.equal(big.k[:, 2], big.k[:, 0])  # two copies of row b0 now differ
    assert big.k.data_ptr() != cache.k.data_ptr() and snap.k.data_ptr() != cache.k.data_ptr()
    # the original goes on unchanged by the branches
    write_block(cache, 9, 3)
    assert held(cache) == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert snap.frames == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_copy_of_a_partly_filled_cache_continues_like_the_original():
    # a history at frame 6 of a 12-frame global cache: select copies the 6 filled frames only
    cache = KVCache(LAYERS, 2, 12, TPF, HEADS, D)
    for a in (0, 3):
        write_block(cache, a, 3, lambda f: f + 0.25)
    branch = cache.select([1, 0, 1])
    assert branch.k.shape == (LAYERS, 3, 12 * TPF, HEADS, D) and branch.length == cache.length
    for i in range(LAYERS):
        for r, src in enumerate([1, 0, 1]):
            assert torch.equal(branch.layer(i)[0][r], cache.layer(i)[0][src])
            assert torch.equal(branch.layer(i)[1][r], cache.layer(i)[1][src])
    # the copy continues past the copied frames exactly as the original does
    write_block(branch, 6, 3)
    write_block(cache, 6, 3)
    assert branch.frames == cache.frames == list(range(9))
    assert torch.equal(branch.layer(0)[0][1], cache.layer(0)[0][0])


def test_reset_and_reset_cross():
    cache = KVCache(LAYERS, 1, 6, TPF, HEADS, D)
    write_block(cache, 0, 3)
    cache.cross[1] = (torch.zeros(1), torch.zeros(1))
    cache.reset_cross()
    assert cache.cross == [None, None] and cache.frames == [0, 1, 2]
    cache.reset()
    assert cache.frames == [] and cache.length == 0
    write_block(cache, 0, 3)  # a new video starts at frame 0 again
    assert cache.frames == [0, 1, 2]


def test_errors():
    cache = KVCache(LAYERS, 1, 6, TPF, HEADS, D)
    write_block(cache, 0, 3)
    write_block(cache, 3, 3)
    with pytest.raises(ValueError, match="global KV cache is full"):
        write_block(cache, 6, 3)
    with pytest.raises(ValueError, match="neither the latest block"):
        write_block(cache, 0, 3)
    with pytest.raises(ValueError, match="local >= sink"):
        check_window(3, sink=3, local=5)
    check_window(3, sink=3, local=6)  # the smallest window that works


def test_memory_is_bounded_by_the_window():
    cache = KVCache(LAYERS, 1, 10_000, TPF, HEADS, D, sink=3, local=12)
    before = cache.nbytes()
    for a in range(0, 300, 3):
        write_block(cache, a, 3)
    assert cache.nbytes() == before == 2 * LAYERS * 12 * TPF * HEADS * D * 4
    assert cache.frames[:3] == [0, 1, 2] and cache.frames[-1] == 299
