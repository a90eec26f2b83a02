"""The update plan every rank computes on its own must agree across ranks (ZeRO-3 collectives) and
cover each sample exactly once per epoch, with global per-mini-batch denominators."""
import pytest

from learner.updates import freeze_batches, pack, padding_tokens, plan_updates, rank_shards

LENGTHS = [7, 3, 9, 4, 4, 12, 5, 8, 6, 2, 10]  # 11 samples: uneven over ranks and mini-batches
TRAINED = [n if i != 5 else 0 for i, n in enumerate(LENGTHS)]  # sample 5 filtered (overlong)


def _plans(world: int, mbs: int, minis: int, epochs: int, seed: int = 3):
    return [plan_updates(LENGTHS, TRAINED, world, r, mbs, minis, epochs, seed) for r in range(world)]


@pytest.mark.parametrize("world,mbs,minis,epochs", [(1, 4, 1, 1), (2, 2, 2, 2), (3, 1, 4, 1), (2, 3, 3, 3)])
def test_every_epoch_covers_each_sample_once_and_ranks_agree(world, mbs, minis, epochs):
    plans = _plans(world, mbs, minis, epochs)
    assert all(len(p) == minis * epochs for p in plans)
    for e in range(epochs):
        seen = [i for p in plans for u in p[e * minis:(e + 1) * minis] for mb in u.micro for i in mb]
        assert sorted(seen) == list(range(len(LENGTHS)))
    for u in range(minis * epochs):
        ups = [p[u] for p in plans]
        assert len({len(x.micro) for x in ups}) == 1  # same number of forwards on every rank
        assert all(len(mb) <= mbs for x in ups for mb in x.micro)
        members = [i for x in ups for mb in x.micro for i in mb]
        assert {x.total_tokens for x in ups} == {float(sum(TRAINED[i] for i in members))}
        assert {x.total_seqs for x in ups} == {float(sum(1 for i in members if TRAINED[i] > 0))}


def test_one_update_keeps_the_length_balanced_shards_in_order():
    (plan,) = _plans(1, 4, 1, 1)
    assert [i for mb in plan[0].micro for i in mb] == sorted(range(len(LENGTHS)), key=LENGTHS.__getitem__)
    for r, shard in enumerate(rank_shards(LENGTHS, 2)):
        (update,) = plan_updates(LENGTHS, TRAINED, 2, r, 2, 1, 1, seed=0)
        assert [i for mb in update.micro for i in mb] == shard


def test_epochs_reshuffle_with_a_shared_seed():
    a, b = _plans(2, 2, 2, 2, seed=3), _plans(2, 2, 2, 2, seed=3)
    assert [u.micro for p in a for u in p] == [u.micro for p in b for u in p]  # same seed: same plan on every call
    epoch0 = [sorted(i for p in a for mb in p[u].micro for i in mb) for u in (0, 1)]
    epoch1 = [sorted(i for p in a for mb in p[u].micro for i in mb) for u in (2, 3)]
    assert epoch0 != epoch1  # the second epoch regroups the samples into other mini-batches
    other = _plans(2, 2, 2, 2, seed=4)
    assert [u.micro for p in a for u in p] != [u.micro for p in other for u in p]


def test_freeze_batches_cover_the_rank_shard_with_equal_counts():
    batches = [freeze_batches(LENGTHS, 3, r, 2) for r in range(3)]
    assert len({len(b) for b in batches}) == 1
    for r, shard in enumerate(rank_shards(LENGTHS, 3)):
        assert sorted(i for mb in batches[r] for i in mb) == sorted(shard)


def test_token_budget_packs_short_sequences_together_and_gives_long_ones_their_own():
    lengths = [10, 12, 11, 50, 9, 30]
    micro = pack(range(6), lengths, size=8, max_tokens=40)
    assert micro == [[4, 0, 2], [1], [5], [3]]  # 3 x 11 = 33 <= 40; 2 x 12 = 24 would fit but [1] + 30 would not
    assert all(len(mb) * max(lengths[i] for i in mb) <= 40 or len(mb) == 1 for mb in micro)
    assert pack(range(6), lengths, size=2) == [[4, 0], [2, 1], [5, 3]]  # no budget: micro_batch_size only
    real, padded = padding_tokens(micro, lengths)
    assert (real, padded) == (122, 33 + 12 + 30 + 50)


@pytest.mark.parametrize("world,minis", [(1, 1), (2, 2), (3, 1)])
def test_token_budget_plans_agree_across_ranks(world, minis):
    plans = [plan_updates(LENGTHS, TRAINED, world, r, 8, minis, 1, seed=1, micro_batch_tokens=20) for r in range(world)]
    for u in range(minis):
        assert len({len(p[u].micro) for p in plans}) == 1
        for p in plans:
            assert all(len(mb) <= 1 or len(mb) * max(LENGTHS[i] for i in mb) <= 20 for mb in p[u].micro)
    assert sorted(i for p in plans for u in p for mb in u.micro for i in mb) == list(range(len(LENGTHS)))
