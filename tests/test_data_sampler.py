import itertools

import pytest

from nemo_lpo.data.sampler import ListwiseSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def global_batches(num_lists, gbs, mbs, dp, seed, steps):
    """The lists of each global batch, gathered over ranks in rank order."""
    per_rank = [take(ListwiseSampler(num_lists, gbs, mbs, r, dp, seed), steps * gbs // (mbs * dp)) for r in range(dp)]
    mb_per_gb = gbs // (mbs * dp)
    return [[i for r in range(dp) for mb in per_rank[r][g * mb_per_gb:(g + 1) * mb_per_gb] for i in mb]
            for g in range(steps)]


def test_global_batch_is_the_same_for_every_dp_size():
    reference = global_batches(50, 8, 1, 1, seed=3, steps=12)  # 12 steps = 2 epochs of 6 batches
    assert global_batches(50, 8, 2, 2, seed=3, steps=12) == reference
    assert global_batches(50, 8, 1, 4, seed=3, steps=12) == reference
    assert global_batches(50, 8, 2, 4, seed=3, steps=12) == reference


def test_rank_takes_contiguous_chunk():
    sampler0, sampler1 = (ListwiseSampler(20, 8, 2, r, 2, seed=0, shuffle=False) for r in range(2))
    assert take(sampler0, 4) == [[0, 1], [2, 3], [8, 9], [10, 11]]
    assert take(sampler1, 4) == [[4, 5], [6, 7], [12, 13], [14, 15]]


def test_epochs_are_seeded_permutations_without_repeats():
    sampler = ListwiseSampler(40, 8, 4, 0, 1, seed=11)
    epoch0 = [i for mb in take(sampler, len(sampler)) for i in mb]
    assert len(epoch0) == 40 and sorted(epoch0) == list(range(40))
    epoch1 = [i for mb in take(sampler, len(sampler)) for i in mb]
    assert sorted(epoch1) == list(range(40)) and epoch1 != epoch0
    again = ListwiseSampler(40, 8, 4, 0, 1, seed=11)
    assert [i for mb in take(again, len(again)) for i in mb] == epoch0
    other_seed = ListwiseSampler(40, 8, 4, 0, 1, seed=12)
    assert [i for mb in take(other_seed, len(other_seed)) for i in mb] != epoch0


def test_tail_is_dropped_and_num_epochs_stops():
    sampler = ListwiseSampler(10, 4, 2, 0, 1, seed=0, num_epochs=2)
    batches = list(sampler)
    assert len(sampler) == 4 and len(batches) == 8


@pytest.mark.parametrize("consumed", [1, 5, 7, 9])
def test_resume_gives_the_exact_next_micro_batch(consumed):
    full = take(ListwiseSampler(30, 6, 1, 1, 3, seed=5), 20)
    first = ListwiseSampler(30, 6, 1, 1, 3, seed=5)
    assert take(first, consumed) == full[:consumed]
    state = first.state_dict()
    resumed = ListwiseSampler(30, 6, 1, 1, 3, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 20 - consumed) == full[consumed:]


def test_resume_with_another_dp_size_at_a_step_boundary():
    # 2 global batches on dp=1, then continue on dp=2: the global batches are unchanged
    one = ListwiseSampler(32, 8, 2, 0, 1, seed=9)
    take(one, 8)
    state = one.state_dict()
    resumed = []
    for rank in range(2):
        sampler = ListwiseSampler(32, 8, 2, rank, 2, seed=9)
        sampler.load_state_dict(state)
        resumed.append(take(sampler, 4))
    step3 = resumed[0][0] + resumed[0][1] + resumed[1][0] + resumed[1][1]
    assert step3 == [i for mb in take(ListwiseSampler(32, 8, 2, 0, 1, seed=9), 12)[8:12] for i in mb]


def test_bad_arguments_and_foreign_state():
    with pytest.raises(ValueError):
        ListwiseSampler(30, 6, 4, 0, 1, seed=0)  # 6 not a multiple of 4
    with pytest.raises(ValueError):
        ListwiseSampler(4, 8, 1, 0, 1, seed=0)
    with pytest.raises(ValueError):
        ListwiseSampler(30, 6, 1, 3, 3, seed=0)
    sampler = ListwiseSampler(30, 6, 1, 0, 1, seed=0)
    with pytest.raises(ValueError):
        sampler.load_state_dict({**sampler.state_dict(), "seed": 1})
